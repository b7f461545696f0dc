"""Flower 1.41's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) driven in process.

The real server workflow runs against an in-memory Grid whose ``send_and_receive`` hands each
message to the real client mod of that node (with its own persistent Context), so both sides
run Flower's own code on the same workload as Confide's benchmark. Clients "drop out" by not
answering a stage, as in Flower's runtime. Used by ``benchmarks/secagg_bench.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    ConfigRecord,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import ServerConfig  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.compat.legacy_context import LegacyContext  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: E402
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (  # noqa: E402
    SecAggPlusWorkflow,
)
from flwr.serverapp.grid import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


class _Proxy(ClientProxy):
    """Only the node id is used by the SecAgg+ workflow."""

    def get_properties(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # noqa: D102
        raise NotImplementedError


class InMemoryGrid(Grid):
    """A Grid that calls each node's ``secaggplus_mod`` in process."""

    def __init__(self, updates: dict[int, np.ndarray], num_examples: dict[int, int],
                 drop_after: dict[int, str]) -> None:
        self.updates = updates
        self.num_examples = num_examples
        self.drop_after = drop_after
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={},
                                      state=RecordDict(), run_config={}) for nid in updates}
        self.stage_index = 0
        self.gone: set[int] = set()
        self.client_seconds: dict[int, float] = {nid: 0.0 for nid in updates}
        self.client_wall: dict[int, float] = {nid: 0.0 for nid in updates}
        self.bytes_up: dict[int, int] = {nid: 0 for nid in updates}
        self.bytes_down: dict[int, int] = {nid: 0 for nid in updates}

    # -- the parts of the Grid API the workflow uses
    def set_run(self, run):  # noqa: D102
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.updates)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        stage = STAGES[self.stage_index]
        self.stage_index += 1
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid in self.gone:
                continue
            # Each node gets its own copy, as over the wire (the workflow shares one content
            # object among all SETUP messages, and the client mod mutates what it receives).
            # Serialising requests and parsing replies is coordinator work; the client's
            # share (parse the request, serialise the reply) is timed as client work.
            proto = message_to_proto(msg)
            self.bytes_down[nid] += proto.ByteSize()

            def fit(m: Message, ctxt: Context, nid: int = nid) -> Message:
                fitres = FitRes(status=Status(Code.OK, ""),
                                parameters=ndarrays_to_parameters([self.updates[nid]]),
                                num_examples=self.num_examples[nid], metrics={})
                return Message(compat.fitres_to_recorddict(fitres, keep_input=True),
                               reply_to=m)

            c0, w0 = time.process_time(), time.perf_counter()
            reply = secaggplus_mod(message_from_proto(proto), self.contexts[nid], fit)
            proto = message_to_proto(reply)
            self.client_seconds[nid] += time.process_time() - c0
            self.client_wall[nid] += time.perf_counter() - w0
            self.bytes_up[nid] += proto.ByteSize()
            replies.append(message_from_proto(proto))
            if self.drop_after.get(nid) == stage:
                self.gone.add(nid)
        return replies


def run_flower_secaggplus(updates: dict[int, np.ndarray], num_examples: dict[int, int], *,
                          num_shares: int, threshold: int, drop_after: dict[int, str],
                          clipping_range: float = 8.0) -> dict[str, object]:
    """One round of Flower's SecAgg+ over ``updates``; returns timings (CPU and wall), bytes
    and the result."""
    # What Flower's runtime sets in a ServerApp process before messages are created.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    grid = InMemoryGrid(updates, num_examples, drop_after)
    manager = SimpleClientManager()
    for nid in updates:
        manager.register(_Proxy(str(nid)))
    for proxy in manager.all().values():
        proxy.node_id = int(proxy.cid)
    n = len(updates)
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n,
                      fraction_evaluate=0.0)
    context = LegacyContext(
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    dim = next(iter(updates.values())).shape
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]), True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1})
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                  clipping_range=clipping_range)
    c0, w0 = time.process_time(), time.perf_counter()
    workflow(grid, context)
    total, wall = time.process_time() - c0, time.perf_counter() - w0
    client = sum(grid.client_seconds.values())
    arrays = context.state.array_records[MAIN_PARAMS_RECORD]
    result = compat.arrayrecord_to_parameters(arrays, keep_input=True)
    return {
        "client_seconds": grid.client_seconds,
        "coordinator_seconds": total - client,
        "coordinator_wall_seconds": wall - sum(grid.client_wall.values()),
        "client_wall": grid.client_wall,
        "bytes_up": grid.bytes_up,
        "bytes_down": grid.bytes_down,
        "result": result,
        "survivors": len(updates) - len(grid.gone),
    }
