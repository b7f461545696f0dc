"""The top floor: the one job builder and the runtime adapters built from it.

Simulation (:mod:`confide.app.simulate`), deployment (:mod:`confide.app.deploy`, the Flower
ServerApp and ClientApp, the client node loop) and the canary audit all assemble a job through
:func:`confide.app.job.build_job`; nothing below this floor imports it.
"""
