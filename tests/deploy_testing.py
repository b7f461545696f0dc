"""Helpers for deployment tests: processes that are always stopped, data partitions, a
recording TCP proxy and a TLS record parser. Loopback only; ports are picked at run time."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid


def child_env() -> dict[str, str]:
    """The environment for child processes (Flower state stays out of $HOME)."""
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s; stderr:\n"
                                 + self.stderr()[-3000:]) from None


@dataclass
class Processes:
    """Every process a test starts; ``stop_all`` stops them (terminate, then kill)."""

    folder: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Proc:
        """``python -m confide.cli ARGS`` in its own session."""
        return self.spawn(name, [sys.executable, "-m", "confide.cli", *args], cwd=cwd,
                          env=env)

    def spawn(self, name: str, argv: list[str], *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Proc:
        """Any program (``flower-superlink`` ...) in its own session, stopped by stop_all."""
        out, err = self.folder / f"{name}.out", self.folder / f"{name}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            popen = subprocess.Popen(  # noqa: S603
                argv, cwd=cwd or self.folder,
                env={**child_env(), **(env or {})}, stdout=fo, stderr=fe,
                start_new_session=True)
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    def run(self, name: str, args: list[str], timeout: float = 120) -> Proc:
        proc = self.start(name, args)
        proc.wait(timeout)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout=10)


@contextlib.contextmanager
def processes(folder: Path) -> Iterator[Processes]:
    group = Processes(folder)
    try:
        yield group
    finally:
        group.stop_all()


def write_partitions(job: Path, folder: Path, overrides: list[str] | None = None) -> list[Path]:
    """The job's simulation partitions as one ``.npz`` (arrays x, y) per client."""
    from confide.app.simulate import build_simulation
    from confide.config import load_config

    sim = build_simulation(load_config(job, overrides or []))
    paths = []
    for i, part in enumerate(sim.partitions):
        path = folder / f"client{i}.npz"
        np.savez(path, x=sim.dataset.x_train[part], y=sim.dataset.y_train[part])
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- in process


class LoopbackGrid(Grid):
    """Each pushed message goes to its node's ClientApp at once; replies wait to be pulled."""

    def __init__(self, apps: dict[int, object]) -> None:
        self.apps = apps
        self.replies: dict[str, Message] = {}
        self.pulled: list[Message] = []
        self.pushed: list[Message] = []
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in apps}

    def push_messages(self, messages):  # noqa: D102
        ids = []
        for m in messages:
            self.pushed.append(m)
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            self.replies[mid] = self.apps[node](m, self.contexts[node])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):  # noqa: D102
        out = [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]
        self.pulled.extend(out)  # every message the coordinator receives
        return out

    def get_node_ids(self):  # noqa: D102
        return list(self.apps)

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def set_run(self, run_id):  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        return None


# --------------------------------------------------------------------------- capture


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that records every byte in both directions."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        #: one entry per connection: (client->server bytes, server->client bytes)
        self.streams: list[tuple[bytearray, bytearray]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            record = (bytearray(), bytearray())
            self.streams.append(record)
            t = threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, client: socket.socket, upstream: socket.socket,
              record: tuple[bytearray, bytearray]) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (upstream, record[0]))
        sel.register(upstream, selectors.EVENT_READ, (client, record[1]))
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst, buf = key.data
                    data = src.recv(65536)
                    if not data:
                        return
                    buf.extend(data)
                    dst.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in [self._accept, *self._threads]:
            t.join(timeout=5)


def tls_records(data: bytes) -> list[tuple[int, int]]:
    """Split a byte stream into TLS records (RFC 8446, Sec. 5.1; RFC 5246, Sec. 6.2).

    Returns ``(content_type, length)`` for each record; raises ValueError at the first byte
    that is not the start of a well-formed record, so any plaintext in the stream fails.
    """
    out, i = [], 0
    while i < len(data):
        if len(data) - i < 5:
            raise ValueError(f"truncated TLS record header at byte {i}")
        ctype, major, minor, length = data[i], data[i + 1], data[i + 2], int.from_bytes(
            data[i + 3:i + 5], "big")
        if ctype not in (20, 21, 22, 23) or major != 3 or minor not in (1, 3):
            raise ValueError(f"byte {i} does not start a TLS record: {data[i:i + 16]!r}")
        if length > 2**14 + 256:  # TLSCiphertext.length limit, RFC 8446 Sec. 5.2
            raise ValueError(f"TLS record at byte {i} is too long ({length})")
        if i + 5 + length > len(data):
            raise ValueError(f"TLS record at byte {i} runs past the end of the capture")
        out.append((ctype, length))
        i += 5 + length
    return out


def contains_any_window(haystack: bytes, needle: bytes, window: int = 32,
                        step: int = 64) -> bool:
    """Whether any ``window``-byte slice of ``needle`` (every ``step`` bytes) occurs."""
    return any(needle[i:i + window] in haystack
               for i in range(0, max(1, len(needle) - window), step))


# --------------------------------------------------------------------------- federations


def offline_federation(folder: Path, names: list[str], port: int, run_cli: Callable,
                       capsys: object) -> Path:
    """A CA and enrolled client folders ``folder/<name>``, all in process (offline enrolment:
    request, operator's answer, import), for a coordinator that will listen on ``port``."""
    fed = folder / "fed"
    code, _, err = run_cli(["ca", "init", str(fed), "--name", "e2e"], capsys)
    if code != 0:
        raise AssertionError(err)
    for name in names:
        code, token, err = run_cli(["enrol", "token", "--ca", str(fed), "--name", name,
                                    "--expires", "1h"], capsys)
        request, answer = folder / f"{name}.request.json", folder / f"{name}.answer.json"
        steps = [["client", "enrol", "--dir", str(folder / name), "--token", token.strip(),
                  "--offline-request", str(request)],
                 ["enrol", "answer", "--ca", str(fed), str(request), "--output", str(answer),
                  "--coordinator", f"127.0.0.1:{port}"],
                 ["client", "enrol", "--dir", str(folder / name), "--import", str(answer)]]
        for args in steps:
            code, _, err = run_cli(args, capsys)
            if code != 0:
                raise AssertionError(f"{args[:2]}: {err}")
    return fed


def read_json(path: Path) -> object:
    """A JSON file written atomically by the coordinator, or None while it is absent."""
    import json

    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- wire bytes


@dataclass
class DeployedRun:
    """A finished deployed job: its history, and the bytes its clients' sockets carried."""

    history: list[dict]
    #: bytes the clients sent / received on their TCP connections to the coordinator after
    #: enrolment, counted by the recording proxy (ciphertext: TLS records with their framing)
    socket_up: int
    socket_down: int
    server_stderr: str


def run_deployed_job(folder: Path, job: Path, run_cli: Callable, capsys: object, *,
                     clients: int = 3, timeout: float = 400) -> DeployedRun:
    """Enrol ``clients`` client processes through a :class:`RecordingProxy`, run ``job`` on
    ``confide server start`` over loopback TLS, and count what crossed the clients' sockets.

    Enrolment connections are left out of the socket count: the history counts the job's
    messages, not the one-off enrolment.
    """
    data = write_partitions(job, folder)
    fed = folder / "fed"
    code, _, err = run_cli(["ca", "init", str(fed), "--name", "e2e"], capsys)
    if code != 0:
        raise AssertionError(err)
    tokens = []
    for i in range(clients):
        code, out, err = run_cli(["enrol", "token", "--ca", str(fed), "--name", f"c{i}",
                                  "--expires", "1h"], capsys)
        if code != 0:
            raise AssertionError(err)
        tokens.append(out.strip())
    port = free_port()
    run = folder / "run"
    with processes(folder) as procs:
        server = procs.start("server", ["server", "start", "--ca", str(fed), "--config",
                                        str(job), "--port", str(port), "--output", str(run),
                                        "--wait", "240", "--round-timeout", "120"])
        wait_for(lambda: port_open(port) or server.popen.poll() is not None, 120,
                 "the coordinator to listen")
        if server.popen.poll() is not None:
            raise AssertionError(server.stderr())
        proxy = RecordingProxy(port)
        try:
            enrols = [procs.start(f"enrol{i}", [
                "client", "enrol", "--coordinator", f"127.0.0.1:{proxy.port}", "--token",
                tokens[i], "--dir", str(folder / f"c{i}")]) for i in range(clients)]
            for p in enrols:
                if p.wait(120) != 0:
                    raise AssertionError(p.stderr())
            first_job_stream = len(proxy.streams)
            started = [procs.start(f"client{i}", [
                "client", "start", "--dir", str(folder / f"c{i}"), "--data", str(data[i]),
                "--threads", "1"]) for i in range(clients)]
            if server.wait(timeout) != 0:
                raise AssertionError(server.stderr()[-3000:])
            for c in started:
                if c.wait(60) != 0:
                    raise AssertionError(c.stderr()[-3000:])
        finally:
            proxy.close()
    streams = proxy.streams[first_job_stream:]
    history = read_json(run / "history.json")
    if not isinstance(history, list):
        raise AssertionError("no history.json")
    return DeployedRun(history=history, socket_up=sum(len(u) for u, _ in streams),
                       socket_down=sum(len(d) for _, d in streams),
                       server_stderr=server.stderr())
