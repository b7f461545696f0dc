"""Deployment commands: ``ca``, ``enrol``, ``clients``, ``server`` and ``client``.

The coordinator's operator runs ``confide ca init``, ``confide enrol token``, ``confide
clients list|revoke`` and ``confide server start``; a client's operator runs ``confide client
enrol`` and ``confide client start``. Every user mistake is one line on stderr and a non-zero
exit code (see :mod:`confide.exceptions`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]

log = logging.getLogger("confide")

def _group(help_text: str) -> typer.Typer:
    # plain click help, as in confide.cli.main: rich help costs start-up time
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None)


ca_app = _group("The federation's certificate authority.")
enrol_app = _group("Enrolment tokens and offline enrolment answers.")
clients_app = _group("The operator's view of enrolled clients.")
server_app = _group("The coordinator on Flower's deployment runtime.")
client_app = _group("A client: enrol once, then start it with its own data.")

CaOpt = Annotated[Path, typer.Option("--ca", help="The federation folder ('confide ca init').")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")]


def _console() -> Any:
    from confide.cli.main import console

    return console


def _logging(quiet: bool) -> None:
    from confide.cli.main import _setup_logging

    _setup_logging(quiet)
    logging.getLogger("flwr").setLevel(logging.WARNING)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` runs (sockets, child processes)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped() -> None:
    from confide.cli.main import fail

    fail("stopped", 130)


# --------------------------------------------------------------------------- ca


@ca_app.command("init")
def ca_init(
    directory: Annotated[Path, typer.Argument(help="New folder for the federation.")],
    name: Annotated[str, typer.Option(help="The federation's name.")] = "confide",
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Host name or IP the coordinator is reached at (repeatable; default "
        "localhost and 127.0.0.1).")] = None,
) -> None:
    """Create a federation: CA, coordinator certificate, token key, registry, CRL."""
    from confide.server.ca import init_federation, load_federation

    paths = init_federation(directory, name=name, hosts=host or ["localhost", "127.0.0.1"])
    fed = load_federation(paths.root)
    _console().print(f"federation {fed.name!r} ({fed.federation_id}) created in {paths.root}\n"
                     f"coordinator certificate valid for: {', '.join(fed.hosts)}\n"
                     f"CA fingerprint (SHA-256): {fed.ca.fingerprint}\n"
                     "keep this folder private: it holds the CA key", highlight=False)


# --------------------------------------------------------------------------- enrol


@enrol_app.command("token")
def enrol_token(
    ca: CaOpt,
    name: Annotated[str | None, typer.Option(help="Bind the token to this client name.")] = None,
    expires: Annotated[str, typer.Option(help="Lifetime, e.g. 30m, 24h, 7d (max 30d).")] = "24h",
) -> None:
    """Issue a one-time, expiring enrolment token (printed on stdout)."""
    from confide.server.ca import load_federation
    from confide.server.enrolment import EnrolmentAuthority, parse_duration

    authority = EnrolmentAuthority(load_federation(ca))
    token = authority.issue_token(name=name, expires=parse_duration(expires))
    print(token)  # noqa: T201 - the token itself, for scripts


@enrol_app.command("answer")
def enrol_answer(
    ca: CaOpt,
    request: Annotated[Path, typer.Argument(help="The client's request file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Answer file to write.")],
    coordinator: Annotated[str | None, typer.Option(
        help="HOST:PORT the client will connect to (written into the answer).")] = None,
) -> None:
    """Answer an offline enrolment request (air-gapped silos)."""
    import json

    from confide.client.enrol import parse_address
    from confide.exceptions import ConfigError, SecurityError
    from confide.server.ca import load_federation
    from confide.server.enrolment import EnrolmentAuthority, parse_enrolment_request

    if coordinator is not None:
        parse_address(coordinator)
    if output.exists():
        raise ConfigError(f"{str(output)!r} already exists; choose another --output")
    try:
        data = request.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"request file {str(request)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"request file {str(request)!r} is unreadable ({exc})") from None
    try:
        req = parse_enrolment_request(data)
    except SecurityError as exc:  # the client's file: name it, and say what is wrong
        raise SecurityError(f"{str(request)!r} is not an enrolment request ({exc})") from None
    authority = EnrolmentAuthority(load_federation(ca))
    result = authority.enrol(token=req.token, csr_pem=req.csr_pem, requested_name=req.name)
    answer = result.to_json()
    if coordinator is not None:
        answer["coordinator"] = coordinator
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(answer, indent=2), encoding="utf-8")
    tmp.replace(output)
    _console().print(f"enrolled client {result.name!r}; give {output} to its operator",
                     highlight=False)


# --------------------------------------------------------------------------- clients


@clients_app.command("list")
def clients_list(
    ca: CaOpt,
    tokens: Annotated[bool, typer.Option("--tokens", help="Also list issued tokens.")] = False,
) -> None:
    """Enrolled clients (and, with --tokens, issued tokens)."""
    from rich.table import Table

    from confide.server.ca import load_federation
    from confide.server.enrolment import Registry

    fed = load_federation(ca)
    registry = Registry(fed.paths.registry)
    table = Table("client", "status", "enrolled", "certificate expires", "fingerprint")
    for c in registry.clients():
        table.add_row(c.name, c.status if c.active else f"revoked {c.revoked_at}",
                      c.enrolled_at, c.not_after, c.fingerprint[:16])
    _console().print(table)
    if tokens:
        t_table = Table("token id", "bound name", "expires", "used")
        for t in registry.tokens():
            t_table.add_row(t.id[:8], t.name or "-", t.expires_at,
                            f"{t.used_at} by {t.used_by}" if t.used_at else "no")
        _console().print(t_table)


@clients_app.command("revoke")
def clients_revoke(
    name: Annotated[str, typer.Argument(help="The client to revoke.")],
    ca: CaOpt,
) -> None:
    """Revoke a client: refused at its next connection, excluded from the next round."""
    from confide.server.ca import load_federation
    from confide.server.enrolment import EnrolmentAuthority

    record = EnrolmentAuthority(load_federation(ca)).revoke(name)
    _console().print(f"client {record.name!r} revoked at {record.revoked_at}", highlight=False)


# --------------------------------------------------------------------------- server


@server_app.command("start")
def server_start(
    ca: CaOpt,
    config: Annotated[Path | None, typer.Option(
        "--config", help="The job file (TOML); with --resume optional (must match).")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue this run folder from its checkpoint and privacy ledger "
                         "(only run.rounds may change; clients reconnect on their own).")
                      ] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a key: section.key=value (repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=0, max=65535)] = 9092,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Run folder (default: runs/<new>).")] = None,
    test_data: Annotated[Path | None, typer.Option(
        help="The coordinator's test set (.npz with x, y) for central evaluation.")] = None,
    wait: Annotated[float, typer.Option(
        help="Seconds to wait for every client to enrol and connect.", min=0)] = 300.0,
    round_timeout: Annotated[float, typer.Option(
        help="Seconds a round waits for client replies.", min=1)] = 600.0,
    insecure: Annotated[bool, typer.Option(
        help="No TLS on the public port (warns; for isolated test networks only).")] = False,
    poll_interval: Annotated[float, typer.Option(
        help="Seconds between polls for replies right after sending (backs off).",
        min=0.001)] = 0.01,
    max_poll_interval: Annotated[float, typer.Option(
        help="Longest wait between polls for replies.", min=0.001)] = 0.1,
    quiet: QuietOpt = False,
) -> None:
    """Start the coordinator (SuperLink, gateway, enrolment) and run the job."""
    from confide.app.deploy import DeployOptions, run_deployment

    _logging(quiet)
    if resume is not None and output is not None:
        from confide.exceptions import ConfigError

        raise ConfigError("--resume continues the run in its own folder; drop --output")
    options = DeployOptions(host=host, port=port, output=output, insecure=insecure,
                            wait_for_clients_s=wait, round_timeout_s=round_timeout,
                            test_data=test_data, poll_interval_s=poll_interval,
                            max_poll_interval_s=max_poll_interval, resume=resume)

    def on_round(record: dict[str, Any]) -> None:
        acc = record.get("test_accuracy")
        log.info("round %d: %d/%d clients%s", record["round"], record["num_clients"],
                 record["num_sampled"], f", test accuracy {acc:.4f}" if acc is not None else "")

    try:
        with _sigterm_as_interrupt():
            run_dir, history = run_deployment(
                ca_dir=ca, config_path=config, overrides=set_ or [], options=options,
                on_start=lambda address: log.info("listening on %s", address),
                on_round_end=on_round)
    except KeyboardInterrupt:
        _stopped()
        return
    final = next((r["test_accuracy"] for r in reversed(history)
                  if r.get("test_accuracy") is not None), None)
    if not quiet and final is not None:
        log.info("done: %d rounds, final test accuracy %.4f", len(history), final)
    _console().print(str(run_dir), highlight=False)


# --------------------------------------------------------------------------- client


@client_app.command("enrol")
def client_enrol(
    directory: Annotated[Path, typer.Option("--dir", help="The client folder to create.")],
    coordinator: Annotated[str | None, typer.Option(
        help="The coordinator's HOST:PORT.")] = None,
    token: Annotated[str | None, typer.Option(help="The one-time enrolment token.")] = None,
    name: Annotated[str | None, typer.Option(
        help="This client's name (when the token does not bind one).")] = None,
    offline_request: Annotated[Path | None, typer.Option(
        help="Write an offline request file instead of connecting.")] = None,
    import_: Annotated[Path | None, typer.Option(
        "--import", help="Complete an offline enrolment with the operator's answer.")] = None,
    insecure: Annotated[bool, typer.Option(
        help="Enrol without TLS (warns; the token crosses the network in the clear).")] = False,
) -> None:
    """Create this client's key here and enrol it with the coordinator."""
    from confide.client.enrol import enrol_online, import_answer, write_offline_request
    from confide.exceptions import ConfigError

    if import_ is not None:
        who = import_answer(directory=directory, answer_file=import_, coordinator=coordinator)
        _console().print(f"client {who!r} enrolled; start it with 'confide client start "
                         f"--dir {directory} --data FILE'", highlight=False)
        return
    if token is None:
        raise ConfigError("give --token TOKEN (from 'confide enrol token')")
    if offline_request is not None:
        write_offline_request(token=token, directory=directory, request_file=offline_request,
                              name=name, coordinator=coordinator)
        _console().print(f"request written to {offline_request}; the key stays in {directory}"
                         ". Bring back the answer and run 'confide client enrol --import "
                         f"ANSWER --dir {directory}'", highlight=False)
        return
    if coordinator is None:
        raise ConfigError("give --coordinator HOST:PORT (or --offline-request FILE)")
    if insecure:
        log.warning("--insecure: the enrolment token crosses the network in the clear")
    who = enrol_online(coordinator=coordinator, token=token, directory=directory, name=name,
                       insecure=insecure)
    _console().print(f"client {who!r} enrolled in {directory}", highlight=False)


@client_app.command("start")
def client_start(
    directory: Annotated[Path, typer.Option("--dir", help="The enrolled client folder.")],
    data: Annotated[Path, typer.Option("--data", help="This client's own data (.npz/.csv).")],
    device: Annotated[str | None, typer.Option(
        help="Training device (default: the job's client.device).")] = None,
    allow_model: Annotated[list[str] | None, typer.Option(
        help="A module:factory model this client agrees to import (repeatable).")] = None,
    poll_interval: Annotated[float, typer.Option(
        help="Seconds between polls right after work (backs off while idle).",
        min=0.001)] = 0.01,
    max_poll_interval: Annotated[float, typer.Option(
        help="Longest wait between polls while idle.", min=0.001)] = 0.1,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for training (default: one; OMP_NUM_THREADS is kept).", min=1)] = None,
    connect_timeout: Annotated[float, typer.Option(
        help="Seconds to keep trying to reach the coordinator.", min=0)] = 60.0,
    reconnect_timeout: Annotated[float, typer.Option(
        help="Seconds to keep retrying (with back-off) a coordinator that was lost, e.g. "
             "while it restarts with --resume.", min=0)] = 300.0,
    insecure: Annotated[bool, typer.Option(
        help="No TLS (only against a coordinator started with --insecure).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Connect to the coordinator and train on local data until the job ends."""
    from confide.app.client_app import TaskRunner, build_client_app
    from confide.client.data import LocalDataFile
    from confide.client.enrol import load_identity
    from confide.client.node import NodeOptions, run_node

    _logging(quiet)
    from confide.threads import apply_thread_policy

    # One intra-op thread unless --threads (or OMP_NUM_THREADS) says otherwise.
    apply_thread_policy(threads if threads is not None else "auto")
    identity = load_identity(directory)
    source = LocalDataFile(data)
    runner = TaskRunner(source, device=device, allowed_model_factories=tuple(allow_model or ()))
    app = build_client_app(runner, identity=lambda _ctx: {"name": identity.name})
    log.info("client %r: %d local samples from %s", identity.name, source.num_examples, data)
    try:
        with _sigterm_as_interrupt():
            rounds = run_node(identity=identity, client_app=app, options=NodeOptions(
                insecure=insecure, poll_interval=poll_interval,
                max_poll_interval=max_poll_interval, connect_timeout=connect_timeout,
                reconnect_timeout=reconnect_timeout))
    except KeyboardInterrupt:
        _stopped()
        return
    if not quiet:
        log.info("served %d rounds", rounds)


def register(app: typer.Typer) -> None:
    """Attach the deployment command groups to the ``confide`` command."""
    app.add_typer(ca_app, name="ca")
    app.add_typer(enrol_app, name="enrol")
    app.add_typer(clients_app, name="clients")
    app.add_typer(server_app, name="server")
    app.add_typer(client_app, name="client")
