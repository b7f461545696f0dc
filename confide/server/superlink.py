"""The coordinator's Flower SuperLink: a child process that only the coordinator can reach.

Flower 1.41's open-source SuperLink serves its Control API (register nodes, start, stop and
list runs), its Runtime API (the ServerApp's channel) and its Fleet API on one HTTP server,
and its Control API authenticates nobody. Bound to a TCP port, even on 127.0.0.1, it served
every local user: from an unprivileged uid on the coordinator host ``ListRuns``, ``ListNodes``
and ``RegisterNode`` with an unenrolled key all succeeded.

What Flower 1.41 offers, and the choice:

* SuperExec authentication (``--superexec-auth-secret-file``) signs only the Runtime API's
  ``AcquireTask``; Control calls are untouched by it. Control API authentication needs the
  account plugins of Flower's enterprise package (``flwr.ee``), which the OSS wheel lacks.
* TLS client certificates: ``flower-superlink`` has no option to require them, and a TCP port
  would stay open to every local user to probe.
* A Unix-domain socket: ``connect(2)`` needs search permission on every folder of the path
  (path_resolution(7), unix(7)), so a socket in a 0700 folder admits its owner (and root)
  only. The kernel authenticates the peer, there is no TCP port at all, and no key exists to
  steal. This is what Confide does; the gateway forwards enrolled clients' Fleet requests to
  the same socket. ``flower-superlink`` itself binds host:port only, so the child runs
  Flower's own app, argument parser and lifespan (as flwr 1.41's ``_run_superlink_http_api``
  does) under uvicorn's ``uds=``. The socket carries plain HTTP: only the coordinator's uid
  can be at either end, so TLS would encrypt for nobody.

Secrets and cleanup: the SuperExec secret reaches the child through a pipe (``/dev/fd/N``)
and is never written to disk. The state folder (the socket, Flower's home) is removed on
every way out: :meth:`SuperLinkProcess.stop` (which ``run_deployment`` reaches on return,
error, Ctrl-C and SIGTERM), ``atexit``, the child itself when it exits on SIGTERM/SIGINT —
including the SIGTERM the kernel sends it when the coordinator dies, even by SIGKILL
(``PR_SET_PDEATHSIG``) — and, should both die at once, the next start, which removes the
folders of coordinators that no longer run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from confide.exceptions import ConfideError, ConfigError, SecurityError
from confide.server.ca import Federation
from confide.server.enrolment import ClientRecord

if TYPE_CHECKING:
    from flwr.supercore.protobuf.client import ProtobufClient

__all__ = ["SuperLinkProcess", "SuperLinkClient", "FAB_PYPROJECT"]

log = logging.getLogger("confide")

#: The run's app bundle. Flower requires one to start a run; its components are names only:
#: the coordinator runs Confide's ServerApp in process, and clients never load code from it.
FAB_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "confide-job"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "confide"

[tool.flwr.app.components]
serverapp = "confide.server.flower_app:app"
clientapp = "confide.app.client_app:app"

[tool.flwr.app.config]
job = ""
"""

#: Host part of the URLs sent over the socket (HTTP/1.1 needs one; nothing resolves it).
_BASE_URL = "http://superlink"

#: The child: Flower 1.41's SuperLink app on a Unix socket. It imports no Confide code (and so
#: no torch), and removes its folder however it exits.
_CHILD = """
import shutil, signal, sys
folder, socket_path = sys.argv[1], sys.argv[2]
sys.argv = ["flower-superlink", *sys.argv[3:]]
# uvicorn re-raises the SIGTERM it stopped on once it is done; with the default action that
# would end the process before the finally clause, so it exits through Python instead.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
try:
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan, _parse_superlink_lifespan_config)
    from flwr.superlink.main import create_app
    config = _parse_superlink_lifespan_config()
    app = create_app(config, SuperLinkLifespan)
    uvicorn.run(app=app, uds=socket_path, reload=False, access_log=True, workers=1,
                log_config=get_uvicorn_log_config(console_handler.level))
finally:
    shutil.rmtree(folder, ignore_errors=True)
"""

#: Flower starts extra gRPC servers on TCP ports when these are set; the child never does.
_TCP_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL (unix(7))

_C = TypeVar("_C", bound="ProtobufClient")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the SuperLink gets SIGTERM if the coordinator dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def private_folder(path: Path) -> Path:
    """``path`` as a folder of this uid that nobody else may enter (made if missing)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    st = os.lstat(path)
    # The temp folder is shared: a folder (or symlink) another user planted under this name
    # would let them reach the socket.
    if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
            or stat.S_IMODE(st.st_mode) & 0o077):
        raise SecurityError(f"{str(path)!r} is not a folder only this user can enter; "
                            "remove it and start again")
    return path


def _remove_stale(base: Path) -> None:
    """Remove state folders of coordinators that are gone (named ``PID-...``)."""
    for folder in base.iterdir():
        pid = folder.name.split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the SuperLink folder of a coordinator that is gone: %s", folder)
        except PermissionError:
            pass  # a live process (of another uid, after pid reuse): leave it


class SuperLinkProcess:
    """A ``flower-superlink`` child serving on a Unix socket in a private folder.

    ``state_base`` is the folder that holds one private folder per SuperLink (default
    ``$TMPDIR/confide-superlink-UID``, made 0700; a short path, since a socket path has at most
    107 bytes).
    """

    def __init__(self, *, federation: Federation, log_path: Path,
                 start_timeout: float = 60.0, state_base: Path | None = None) -> None:
        self.federation = federation
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.state_base = state_base or Path(tempfile.gettempdir()) / (
            f"confide-superlink-{os.getuid()}")
        self.state_dir: Path | None = None
        self.socket_path: Path | None = None
        #: the SuperExec secret (in memory; the child reads it from a pipe)
        self.secret = secrets.token_bytes(32)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def address(self) -> str:
        """``unix:PATH`` of the socket (what :class:`~confide.server.gateway.Gateway` takes)."""
        return f"unix:{self._socket()}"

    def connect(self, client_class: type[_C], **kwargs: Any) -> _C:
        """A Flower protobuf-over-HTTP client (Control, Runtime) talking over the socket."""
        return _over_socket(client_class(_BASE_URL, **kwargs), self._socket())

    def _socket(self) -> Path:
        if self.socket_path is None:
            raise ConfideError("the SuperLink is not running")
        return self.socket_path

    def start(self) -> None:
        """Start the SuperLink and wait until its API answers on the socket."""
        if importlib.util.find_spec("flwr") is None:
            raise ConfigError("Flower is not installed; install 'confide[flower]'")
        base = private_folder(self.state_base)
        _remove_stale(base)
        self.state_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))  # 0700
        self.socket_path = self.state_dir / "superlink.sock"
        atexit.register(self.stop)
        try:
            if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
                raise ConfigError(f"the SuperLink's socket path {str(self.socket_path)!r} is "
                                  "too long for a Unix socket; set TMPDIR to a shorter folder")
            self._spawn(self.state_dir, self.socket_path)
            self._wait_until_ready(self.socket_path)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, state_dir: Path, socket_path: Path) -> None:
        p = self.federation.paths
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, self.secret)  # 32 bytes: fits the pipe, never blocks
        finally:
            os.close(write_fd)
        # Flower's parser insists on certificates when node authentication is on; the
        # socket itself carries plain HTTP (see the module docstring). The child runs in its
        # state folder, so a federation given as a relative path ('--ca fed') is resolved.
        cmd = [sys.executable, "-c", _CHILD, str(state_dir), str(socket_path),
               "--ssl-certfile", str(p.link_cert.resolve()),
               "--ssl-keyfile", str(p.link_key.resolve()),
               "--ssl-ca-certfile", str(p.ca_cert.resolve()), "--enable-supernode-auth",
               "--isolation", "process", "--disable-runtime-dependency-installation",
               "--superexec-auth-secret-file", f"/dev/fd/{read_fd}"]
        env = dict(os.environ, FLWR_HOME=str(state_dir / "flwr"),
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
        for name in _TCP_SWITCHES:
            env.pop(name, None)
        self._log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=state_dir,
                pass_fds=(read_fd,),
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
        finally:
            os.close(read_fd)

    def _wait_until_ready(self, socket_path: Path) -> None:
        probe = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=2)
        deadline = time.monotonic() + self.start_timeout
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise ConfideError(f"the SuperLink exited at start-up (code "
                                       f"{code}); see {self.log_path}")
                if socket_path.exists():
                    with contextlib.suppress(httpx.HTTPError):
                        if probe.get(f"{_BASE_URL}/health").status_code == 200:
                            # uvicorn makes the socket 0666; the folder already keeps
                            # others out, and the socket no longer admits them either.
                            os.chmod(socket_path, 0o600)
                            return
                time.sleep(0.2)
        finally:
            probe.close()
        raise ConfideError(f"the SuperLink did not start within {self.start_timeout:g} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """Terminate the SuperLink (kill it if it lingers) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        atexit.unregister(self.stop)


def _over_socket(client: _C, socket_path: Path) -> _C:
    """Send a Flower protobuf-over-HTTP client's requests over the SuperLink's socket."""
    # Flower's clients build their own httpx.Client and take no transport; the replacement
    # keeps its timeout and redirect policy and changes only where the bytes go.
    old = client._client  # noqa: SLF001
    client._client = httpx.Client(  # noqa: SLF001
        transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=old.timeout,
        follow_redirects=True)
    old.close()
    return client


def _fast_pull_grid_class(socket_path: Path) -> type:
    """Flower's ``HttpGrid`` pulling reply objects with a 10 ms back-off instead of 1 s.

    A reply's message header can reach the SuperLink a few milliseconds before its objects
    do; ``HttpGrid.pull_messages`` then retries after Flower's default 1 s back-off, which
    alone would exceed a round's time budget on a fast network. Same protocol, same checks.
    """
    from flwr.app.message import Message
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        inflate_object_from_contents,
        pull_objects,
    )
    from flwr.superlink.grid import HttpGrid

    class FastPullHttpGrid(HttpGrid):
        def _connect(self) -> None:
            super()._connect()
            if self._client is not None:
                _over_socket(self._client, socket_path)

        def pull_messages(self, message_ids: Any) -> list[Message]:
            run_id = self.run.run_id
            res = self._runtime_client.PullMessages(
                PullAppMessagesRequest(message_ids=list(message_ids)))
            out: list[Message] = []
            for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
                mid = proto.metadata.message_id
                try:
                    contents = pull_objects(
                        [t.object_id for t in iterate_object_tree(tree)],
                        pull_object_fn=make_pull_object_fn_protobuf(
                            self._runtime_client.PullObject, self.node, run_id),
                        initial_backoff=0.01, backoff_cap=0.5, max_time=60)
                except ObjectPullError as exc:  # the reply counts as missing
                    log.warning("a reply's objects never arrived: %s", exc)
                    continue
                self._runtime_client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
                    node=self.node, run_id=run_id, message_object_id=mid))
                message: Any = inflate_object_from_contents(mid, contents)
                message.metadata.__dict__["_message_id"] = mid
                out.append(message)
            return out

    return FastPullHttpGrid


class SuperLinkClient:
    """The coordinator's clients of its SuperLink's Control and Runtime APIs (on the socket)."""

    def __init__(self, link: SuperLinkProcess) -> None:
        from flwr.supercore.control.control_http_client import ControlHttpClient

        self.link = link
        self.control = link.connect(ControlHttpClient)
        self.grid: Any = None
        self._heartbeat: Any = None

    def register(self, record: ClientRecord) -> int:
        """Register an enrolled client's key as a SuperNode; returns its node id."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        res = self.control.RegisterNode(RegisterNodeRequest(
            public_key=record.public_key.encode("ascii"), name=record.name))
        return int(res.node_id)

    def unregister(self, node_id: int) -> None:
        """Remove a SuperNode (its authenticated requests fail from now on)."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        self.control.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def start_run(self, job_digest: str) -> Any:
        """Start the run and take its ServerApp task; returns the connected HttpGrid."""
        from flwr.cli.build import build_fab_from_files
        from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.fab import Fab
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.task_identity import TaskIdentity

        fab_bytes, _ = build_fab_from_files({"pyproject.toml": FAB_PYPROJECT.encode()})
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        res = self.control.StartRun(StartRunRequest(
            fab=fab_to_proto(fab), override_config=user_config_to_proto({"job": job_digest})))
        if not res.HasField("run_id"):
            raise ConfideError("the SuperLink refused to start the run")
        runtime = self.link.connect(RuntimeHttpClient, interceptors=[
            SuperExecAuthHttpInterceptor(
                master_secret=self.link.secret,
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))])
        token = ""
        deadline = time.monotonic() + 30
        while not token and time.monotonic() < deadline:
            acquired = runtime.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.SERVER_APP.value]))
            token = acquired.token
            if not token:
                time.sleep(0.1)
        runtime.close()
        if not token:
            raise ConfideError("could not acquire the run's ServerApp task from the SuperLink")
        # "superlink" only names the host in the URLs; the grid's requests go to the socket.
        grid = _fast_pull_grid_class(self.link._socket())(  # noqa: SLF001
            "superlink", insecure=True, token=token)
        task = grid._runtime_client.PullTaskInput(PullTaskInputRequest())  # noqa: SLF001
        run = run_from_proto(task.run)
        TaskIdentity.task_id = task.task_id
        TaskIdentity.run_id = run.run_id
        TaskIdentity.node_id = task.context.node_id
        grid.set_run(run)
        self.grid = grid
        self._heartbeat = HeartbeatSender(self._task_heartbeat)
        self._heartbeat.start()
        return grid

    def _task_heartbeat(self) -> bool:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        try:
            res = self.grid._runtime_client.SendTaskHeartbeat(  # noqa: SLF001
                SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return bool(res.success)

    def finish_run(self, *, ok: bool, details: str) -> None:
        """Record the task's final status and close the Runtime connection."""
        from flwr.common.constant import SubStatus
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest

        if self._heartbeat is not None and self._heartbeat.is_running:
            self._heartbeat.stop()
        if self.grid is not None:
            with contextlib.suppress(httpx.HTTPError):
                self.grid._retry_invoker.max_tries = 1  # noqa: SLF001
                self.grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(  # noqa: SLF001
                    sub_status=SubStatus.COMPLETED if ok else SubStatus.FAILED,
                    details=details))
            self.grid.close()
        self.control.close()
