"""Client enrolment: a key pair made here, a CSR, and the certificate the coordinator issues.

The private key is generated on the client and never leaves it: only a PKCS #10 certificate
signing request (RFC 2986) travels, with the one-time token. Before the token is sent, the
client checks that the coordinator's CA matches the fingerprint pinned in the token, so a
wrong address or a man in the middle never sees it. Air-gapped silos use the offline path:
``--offline-request FILE`` writes the request, the operator answers it with
``confide enrol answer``, and ``--import ANSWER`` completes the client folder.

A client folder holds ``client.key`` (mode 0600), ``client.pem``, ``ca.pem`` and
``client.toml``; it is written to a staging folder and renamed into place, so a failed
enrolment leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import shutil
import socket
import ssl
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from confide.exceptions import ConfigError, SecurityError
from confide.pki import (
    CURVE,
    X509_PARSE_ERRORS,
    decode_json_object,
    fingerprint_pin,
    load_certificate,
    load_private_key,
    make_csr,
    parse_certificate,
    parse_token,
    same_public_key,
    valid_client_name,
    write_private_key,
)

__all__ = [
    "ClientIdentity",
    "load_identity",
    "enrol_online",
    "write_offline_request",
    "import_answer",
    "parse_address",
    "ENROL_PATH",
    "CA_PATH",
    "decode_enrolment_answer",
]

ENROL_PATH = "/confide/v1/enrol"
CA_PATH = "/confide/v1/ca"
_PENDING = "pending.json"
_MAX_RESPONSE = 1 << 20
_EXTENSION_ERRORS: tuple[type[Exception], ...] = (
    x509.ExtensionNotFound, x509.DuplicateExtension, *X509_PARSE_ERRORS)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> ``(host, port)``, ConfigError if malformed."""
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        ok = bool(sep)
    else:
        host, _, port_text = text.rpartition(":")
        ok = ":" not in host
    if not ok or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"coordinator address {address!r} is not HOST:PORT (e.g. "
                          "coordinator.example.org:9092)")
    return host, int(port_text)


@dataclass
class ClientIdentity:
    """A loaded client folder."""

    directory: Path
    name: str
    coordinator: str
    federation: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate

    @property
    def key_path(self) -> Path:  # noqa: D102
        return self.directory / "client.key"

    @property
    def cert_path(self) -> Path:  # noqa: D102
        return self.directory / "client.pem"

    @property
    def ca_path(self) -> Path:  # noqa: D102
        return self.directory / "ca.pem"

    def tls_context(self) -> ssl.SSLContext:
        """TLS 1.2+ context that trusts only the federation CA and presents our cert."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


def load_identity(directory: str | Path) -> ClientIdentity:
    """Load and check a client folder (one-line errors for every inconsistency)."""
    d = Path(directory)
    if not d.is_dir():
        raise ConfigError(f"client folder {str(d)!r} not found; enrol first with 'confide "
                          "client enrol'")
    if (d / _PENDING).is_file():
        raise ConfigError(f"enrolment of {str(d)!r} is not finished; import the coordinator's "
                          "answer with 'confide client enrol --import ANSWER --dir DIR'")
    manifest_path = d / "client.toml"
    if not manifest_path.is_file():
        raise ConfigError(f"{str(d)!r} is not a client folder (client.toml is missing)")
    try:
        manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))["client"]
        name, coordinator, federation = (str(manifest[k]) for k in
                                         ("name", "coordinator", "federation"))
    except (tomllib.TOMLDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"{str(manifest_path)!r} is damaged") from None
    key = load_private_key(d / "client.key")
    cert = load_certificate(d / "client.pem")
    ca = load_certificate(d / "ca.pem")
    if not same_public_key(cert.public_key(), key.public_key()):
        raise SecurityError(f"{str(d / 'client.pem')!r} does not belong to this client's key")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means "not issued by this CA"
        raise SecurityError(f"the certificate in {str(d)!r} was not issued by its CA "
                            "(files from different federations?)") from None
    if ca.fingerprint(hashes.SHA256()).hex() != federation:
        raise SecurityError(f"{str(d / 'ca.pem')!r} is not the CA this client enrolled with")
    return ClientIdentity(directory=d, name=name, coordinator=coordinator,
                          federation=federation, key=key, certificate=cert, ca_certificate=ca)


# --------------------------------------------------------------------------- staging


@contextlib.contextmanager
def _staging(target: Path) -> Any:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{str(target)!r} already exists and is not empty; give a new "
                          "--dir for this client")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.enrol-"))
    os.chmod(staging, 0o700)
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_csr = make_csr


def decode_enrolment_answer(answer: Any, *, key: ec.EllipticCurvePrivateKey,
                            pin: bytes) -> tuple[str, x509.Certificate, x509.Certificate]:
    """``(name, certificate, ca_certificate)`` of the coordinator's answer, all checked.

    The CA must match the token's pin, the certificate must be issued by it, for ``key``,
    and for TLS client authentication (RFC 5280, Sec. 4.2.1.12). Any failure, including
    input ``cryptography`` cannot parse, is a one-line SecurityError.
    """
    if not isinstance(answer, dict):
        raise SecurityError("the coordinator's enrolment answer is malformed")
    name, cert_pem, ca_pem = (answer.get(k) for k in ("name", "certificate", "ca_certificate"))
    if not (isinstance(name, str) and isinstance(cert_pem, str) and isinstance(ca_pem, str)
            and cert_pem.isascii() and ca_pem.isascii()):
        raise SecurityError("the coordinator's enrolment answer is malformed")
    if not valid_client_name(name):
        raise SecurityError("the coordinator's enrolment answer names the client wrongly")
    cert = parse_certificate(cert_pem.encode("ascii"), what="the issued certificate")
    ca = parse_certificate(ca_pem.encode("ascii"), what="the answer's CA certificate")
    cert_key = cert.public_key()
    if not hmac.compare_digest(fingerprint_pin(ca), pin):
        raise SecurityError("the answer's CA does not match the token's federation")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means "not issued by this CA"
        raise SecurityError("the issued certificate is not signed by the federation CA"
                            ) from None
    if not same_public_key(cert_key, key.public_key()):
        raise SecurityError("the issued certificate is for a different key")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except _EXTENSION_ERRORS:
        eku = None  # absent, or extensions that do not parse
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise SecurityError("the issued certificate is not a TLS client certificate")
    return name, cert, ca


def _finish(folder: Path, *, key: ec.EllipticCurvePrivateKey, answer: dict[str, Any],
            pin: bytes, coordinator: str) -> str:
    """Check the coordinator's answer and write the certificate files into ``folder``."""
    name, cert, ca = decode_enrolment_answer(answer, key=key, pin=pin)
    (folder / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "client.toml").write_text(tomli_w.dumps({"client": {
        "name": name, "coordinator": coordinator,
        "federation": ca.fingerprint(hashes.SHA256()).hex()}}), encoding="utf-8")
    return name


# --------------------------------------------------------------------------- online


def _http_request(sock: ssl.SSLSocket | socket.socket, *, method: str, host: str, path: str,
                  body: bytes = b"") -> tuple[int, bytes]:
    import h11

    conn = h11.Connection(h11.CLIENT)
    headers = [("host", host), ("content-type", "application/json"),
               ("content-length", str(len(body))), ("connection", "close")]
    sock.sendall(conn.send(h11.Request(method=method, target=path, headers=headers)))
    if body:
        sock.sendall(conn.send(h11.Data(data=body)))
    sock.sendall(conn.send(h11.EndOfMessage()))
    status, chunks, size = 0, [], 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > _MAX_RESPONSE:
                    raise SecurityError("the coordinator's answer is too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, b"".join(chunks)
    except h11.ProtocolError as exc:  # the peer's HTTP does not parse (RFC 9112 framing)
        raise SecurityError(f"the coordinator's answer is not valid HTTP ({exc})") from None


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise SecurityError(f"cannot reach the coordinator at {host}:{port} ({exc.strerror or exc}"
                            ")") from None


def _fetch_ca(host: str, port: int, pin: bytes, *, insecure: bool,
              timeout: float) -> x509.Certificate:
    """The coordinator's CA, accepted only if it matches the token's pin."""
    sock: socket.socket = _connect(host, port, timeout)
    try:
        if not insecure:
            # Unverified on purpose: the CA is not known yet. Nothing secret is sent on this
            # connection, and what comes back is accepted only if it matches the pin.
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.check_hostname = False
            probe.verify_mode = ssl.CERT_NONE
            sock = probe.wrap_socket(sock, server_hostname=host)
        status, body = _http_request(sock, method="GET", host=host, path=CA_PATH)
    except ssl.SSLError as exc:
        raise SecurityError(f"TLS with {host}:{port} failed ({exc.reason}); is it a Confide "
                            "coordinator started without --insecure?") from None
    except OSError as exc:
        raise SecurityError(f"the coordinator at {host}:{port} closed the connection ({exc})"
                            ) from None
    finally:
        sock.close()
    try:
        ca = parse_certificate(body, what="the CA") if status == 200 else None
    except SecurityError:
        ca = None
    if ca is None:
        raise SecurityError(f"{host}:{port} did not answer with a federation CA (HTTP {status});"
                            " is it a Confide coordinator?")
    if not hmac.compare_digest(fingerprint_pin(ca), pin):
        raise SecurityError(f"the coordinator at {host}:{port} belongs to another federation "
                            "than the token (wrong address, or someone in the middle)")
    return ca


def enrol_online(*, coordinator: str, token: str, directory: str | Path,
                 name: str | None = None, insecure: bool = False,
                 timeout: float = 30.0) -> str:
    """Enrol with a running coordinator; returns the client name."""
    host, port = parse_address(coordinator)
    _tid, _mac, pin = parse_token(token)
    with _staging(Path(directory)) as folder:
        key = ec.generate_private_key(CURVE())
        write_private_key(folder / "client.key", key)
        ca = _fetch_ca(host, port, pin, insecure=insecure, timeout=timeout)
        body = json.dumps({"version": 1, "token": token.strip(), "name": name,
                           "csr": _csr(key, name).decode("ascii")}).encode()
        sock: socket.socket = _connect(host, port, timeout)
        try:
            if not insecure:
                ctx = ssl.create_default_context(
                    cadata=ca.public_bytes(serialization.Encoding.PEM).decode("ascii"))
                sock = ctx.wrap_socket(sock, server_hostname=host)
            status, reply = _http_request(sock, method="POST", host=host, path=ENROL_PATH,
                                          body=body)
        except ssl.SSLCertVerificationError as exc:
            raise SecurityError(f"the coordinator's certificate is not valid for {host} "
                                f"({exc.verify_message})") from None
        except (ssl.SSLError, OSError) as exc:
            raise SecurityError(f"enrolment connection to {host}:{port} failed ({exc})"
                                ) from None
        finally:
            sock.close()
        try:
            answer: dict[str, Any] | None = decode_json_object(
                reply, what="the coordinator's answer", max_bytes=_MAX_RESPONSE)
        except SecurityError:
            answer = None
        if status != 200 or answer is None:
            reason = answer.get("error") if answer is not None else None
            reason = str(reason)[:200] if reason else f"HTTP {status}"
            raise SecurityError(f"enrolment refused: {reason}")
        return _finish(folder, key=key, answer=answer, pin=pin, coordinator=coordinator)


# --------------------------------------------------------------------------- offline


def write_offline_request(*, token: str, directory: str | Path, request_file: str | Path,
                          name: str | None = None, coordinator: str | None = None) -> None:
    """Create the key and a request file for an air-gapped enrolment."""
    _tid, _mac, pin = parse_token(token)
    if coordinator is not None:
        parse_address(coordinator)
    out = Path(request_file)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists; choose another request file name")
    with _staging(Path(directory)) as folder:
        key = ec.generate_private_key(CURVE())
        write_private_key(folder / "client.key", key)
        (folder / _PENDING).write_text(json.dumps({"pin": pin.hex(), "name": name,
                                                   "coordinator": coordinator}))
        request = {"confide_enrolment_request": 1, "token": token.strip(), "name": name,
                   "csr": _csr(key, name).decode("ascii")}
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(request, indent=2), encoding="utf-8")
        tmp.replace(out)


def import_answer(*, directory: str | Path, answer_file: str | Path,
                  coordinator: str | None = None) -> str:
    """Complete an offline enrolment with the operator's answer file; returns the name."""
    d = Path(directory)
    pending_path = d / _PENDING
    if not pending_path.is_file():
        raise ConfigError(f"{str(d)!r} has no pending enrolment; create one with "
                          "'confide client enrol --offline-request FILE'")
    try:
        pending = json.loads(pending_path.read_text(encoding="utf-8"))
        pin = bytes.fromhex(pending["pin"])
    except (json.JSONDecodeError, KeyError, ValueError):
        raise ConfigError(f"{str(pending_path)!r} is damaged") from None
    try:
        text = Path(answer_file).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"answer file {str(answer_file)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"answer file {str(answer_file)!r} is unreadable ({exc})") from None
    try:
        answer = decode_json_object(text, what=f"answer file {str(answer_file)!r}",
                                    max_bytes=_MAX_RESPONSE)
    except SecurityError:
        raise SecurityError(f"answer file {str(answer_file)!r} is not valid JSON") from None
    address = coordinator or pending.get("coordinator") or answer.get("coordinator")
    if not isinstance(address, str | None):
        raise SecurityError("the enrolment answer names the coordinator wrongly")
    if not address:
        raise ConfigError("give --coordinator HOST:PORT (the answer does not name it)")
    parse_address(address)
    key = load_private_key(d / "client.key")
    # Finish into a staging copy so a bad answer leaves the pending folder intact.
    staging = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.import-"))
    try:
        shutil.copy2(d / "client.key", staging / "client.key")
        name = _finish(staging, key=key, answer=answer, pin=pin, coordinator=address)
        backup = d.with_name(f".{d.name}.pending-old")
        os.replace(d, backup)
        os.replace(staging, d)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return name
