"""The SuperLink's control surface is the coordinator's alone, and leaves no secrets behind.

Found before (issue 12): as an unprivileged uid on the coordinator host, ``ListRuns``,
``ListNodes`` and ``RegisterNode`` with an unenrolled key all succeeded on the SuperLink's
loopback port, and a SIGKILLed coordinator left the SuperLink's folder with
``superexec.secret`` behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from confide.exceptions import SecurityError
from confide.server.ca import init_federation, load_federation
from confide.server.superlink import SuperLinkClient, SuperLinkProcess, private_folder

OTHER_USER = "confide-probe"
SYSTEM_PYTHON = "/usr/bin/python3"  # the test runner's Python may sit under /root (0700)

#: Stdlib only: what any local user can run. Raw HTTP/1.1 over the SuperLink's Unix socket.
_PROBE = textwrap.dedent("""
    import json, socket, sys
    path, register_body = sys.argv[1], bytes.fromhex(sys.argv[2])
    calls = {"ListRuns": ("/v1/control/list-runs", b""),
             "ListNodes": ("/v1/control/list-nodes", b""),
             "RegisterNode": ("/v1/control/register-node", register_body)}
    out = {}
    for name, (route, body) in calls.items():
        try:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            s.sendall((f"POST {route} HTTP/1.1\\r\\nHost: superlink\\r\\n"
                       "Content-Type: application/protobuf\\r\\n"
                       "Accept: application/protobuf\\r\\nConnection: close\\r\\n"
                       f"Content-Length: {len(body)}\\r\\n\\r\\n").encode() + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            out[name] = data.split(b" ", 2)[1].decode()
        except OSError as exc:
            out[name] = type(exc).__name__
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("sl")
    init_federation(root / "fed", name="sl", hosts=["127.0.0.1"])
    return load_federation(root / "fed")


@pytest.fixture(scope="module")
def link(federation, tmp_path_factory):
    """A SuperLink in the default state folder (under the shared temp folder, as deployed)."""
    process = SuperLinkProcess(federation=federation,
                               log_path=tmp_path_factory.mktemp("sllog") / "superlink.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def other_user():
    """A throwaway unprivileged account (made here when missing, removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user and run a process as it")
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"needs {SYSTEM_PYTHON} (a Python any user can execute)")
    created = False
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",  # noqa: S607
                        "/usr/sbin/nologin", OTHER_USER], check=True, capture_output=True)
        created = True
    try:
        yield pwd.getpwnam(OTHER_USER)
    finally:
        if created:
            subprocess.run(["userdel", OTHER_USER], check=False,  # noqa: S607
                           capture_output=True)


def _register_body() -> str:
    from flwr.proto.control_pb2 import RegisterNodeRequest

    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return RegisterNodeRequest(public_key=pem).SerializeToString().hex()


def _probe(link: SuperLinkProcess, user: pwd.struct_passwd | None) -> dict[str, str]:
    """The three calls, made by a process of ``user`` (None: the coordinator's own uid)."""
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid,
                                       "extra_groups": []}
    res = subprocess.run([SYSTEM_PYTHON, "-I", "-c", _PROBE, str(link.socket_path),  # noqa: S603
                          _register_body()], capture_output=True, text=True, cwd="/",
                         env={"PATH": "/usr/bin:/bin"}, timeout=60, check=True, **as_user)
    return json.loads(res.stdout)


def test_another_uid_is_refused_while_the_coordinator_works(link, other_user):
    refused = _probe(link, other_user)
    assert refused == {"ListRuns": "PermissionError", "ListNodes": "PermissionError",
                       "RegisterNode": "PermissionError"}
    assert _probe(link, None) == {"ListRuns": "200", "ListNodes": "200",
                                  "RegisterNode": "200"}
    client = SuperLinkClient(link)  # and Confide's own client of the Control API
    try:
        from flwr.proto.control_pb2 import ListNodesRequest

        assert len(client.control.ListNodes(ListNodesRequest()).nodes_info) >= 1
    finally:
        client.control.close()


def test_the_folder_permissions_are_what_refuses_the_other_uid(link, other_user):
    """Control: with the folders and socket opened up, the same probe as that uid gets in."""
    base, folder, sock = link.state_base, link.socket_path.parent, link.socket_path
    for path, mode in ((base, 0o711), (folder, 0o711), (sock, 0o666)):
        os.chmod(path, mode)
    try:
        assert _probe(link, other_user)["ListNodes"] == "200"
    finally:
        for path, mode in ((sock, 0o600), (folder, 0o700), (base, 0o700)):
            os.chmod(path, mode)
    assert _probe(link, other_user)["ListNodes"] == "PermissionError"


def test_state_folder_is_private_and_holds_no_secret(link):
    folder = link.socket_path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(link.socket_path.stat().st_mode) == 0o600
    names = [p.name for p in folder.rglob("*")]
    assert "superexec.secret" not in names
    for path in folder.rglob("*"):
        if path.is_file():
            assert link.secret not in path.read_bytes()


def test_a_planted_state_folder_is_refused(tmp_path):
    planted = tmp_path / "base"
    planted.mkdir(mode=0o755)
    os.chmod(planted, 0o755)
    with pytest.raises(SecurityError, match="only this user"):
        private_folder(planted)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(SecurityError):
        private_folder(tmp_path / "link")


# ----------------------------------------------------------------- every way out

_COORDINATOR = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from confide.server.ca import load_federation
    from confide.server.superlink import SuperLinkProcess
    link = SuperLinkProcess(federation=load_federation(sys.argv[1]),
                            log_path=Path(sys.argv[2]), state_base=Path(sys.argv[3]))
    link.start()
    print(link.state_dir, link.process.pid, flush=True)
    if sys.argv[4] == "exit":
        sys.exit(0)  # atexit stops the SuperLink
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it holds no folder or socket
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_superlink_and_its_folder_are_gone_however_the_coordinator_ends(federation, tmp_path,
                                                                        how):
    base = Path(f"/tmp/confide-t{os.getpid()}")  # short: a socket path has at most 107 bytes
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o700)
    coordinator = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", _COORDINATOR, str(federation.paths.root),
         str(tmp_path / "superlink.log"), str(base), how],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert coordinator.stdout is not None
        state_dir, child = coordinator.stdout.readline().split()
        assert Path(state_dir).is_dir()
        if how != "exit":
            coordinator.send_signal(getattr(signal, how))
        coordinator.wait(timeout=30)
        for _ in range(300):  # the child saw its parent die (PR_SET_PDEATHSIG) and exits
            if _gone(int(child)) and not Path(state_dir).exists():
                break
            time.sleep(0.1)
        assert _gone(int(child))
        assert not Path(state_dir).exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            coordinator.kill()
        coordinator.wait()
        if coordinator.stdout is not None:
            coordinator.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


def test_next_start_removes_folders_of_coordinators_that_are_gone(federation, tmp_path):
    base = private_folder(Path(f"/tmp/confide-s{os.getpid()}"))
    stale = base / "4194305-left"  # above Linux's largest pid: no such process
    stale.mkdir(mode=0o700)
    (stale / "superlink.sock").write_bytes(b"")
    live = base / f"{os.getpid()}-mine"
    live.mkdir(mode=0o700)
    link = SuperLinkProcess(federation=federation, log_path=tmp_path / "superlink.log",
                            state_base=base)
    try:
        link.start()
        assert not stale.exists()
        assert live.exists()  # this process is alive: its folder is kept
    finally:
        link.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_a_federation_given_as_a_relative_path_starts(federation, tmp_path, monkeypatch):
    """``server start --ca fed`` from the folder above: the child runs in its state folder,
    where 'fed/...' does not exist (found by benchmarks/deploy_round_time.py)."""
    root = federation.paths.root
    monkeypatch.chdir(root.parent)
    link = SuperLinkProcess(federation=load_federation(root.name),
                            log_path=tmp_path / "superlink.log")
    try:
        link.start()
        assert link.process is not None and link.process.poll() is None
    finally:
        link.stop()
