"""Enrolment: one-time expiring tokens, the client registry, and revocation.

A token is ``cfd1.<id>.<mac>.<pin>`` (base64url fields; format and parser in
:mod:`confide.pki`, shared with the client):

* ``id``: 16 random bytes naming a record in the registry (name, expiry, used or not);
* ``mac``: HMAC-SHA256 under the federation's token key over the id, the bound client name
  and the expiry time (RFC 2104; Bellare, Canetti, Krawczyk 1996: a PRF, so nobody without
  the key can produce a valid MAC for any id, and editing the record's expiry or name
  invalidates it). It is compared in constant time;
* ``pin``: the first 16 bytes of the CA certificate's SHA-256 fingerprint, so the client
  authenticates the coordinator before it sends the token (as ``kubeadm join`` pins the
  CA with ``--discovery-token-ca-cert-hash``).

Requests from clients are decoded by :func:`parse_enrolment_request` (bounded, one-line
SecurityError for anything malformed) and their CSRs by :func:`confide.pki.load_csr`.

A token is consumed in the same locked registry update that records the client, so it can
be used once even when two enrolments race. The registry is a JSON file replaced
atomically under an exclusive ``flock``; the CRL is rewritten on every revocation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from confide.exceptions import ConfigError, SecurityError
from confide.pki import (
    TOKEN_PREFIX,
    b64encode,
    certificate_fingerprint,
    decode_json_object,
    fingerprint_pin,
    format_token,
    load_csr,
    parse_token,
    public_key_pem,
    valid_client_name,
)
from confide.server.ca import Federation, empty_registry_json, write_crl

__all__ = [
    "ClientRecord",
    "TokenRecord",
    "Registry",
    "EnrolmentAuthority",
    "EnrolmentResult",
    "parse_token",
    "parse_duration",
    "empty_registry_json",
    "TOKEN_PREFIX",
    "EnrolmentRequest",
    "parse_enrolment_request",
    "MAX_REQUEST_BYTES",
]

_MAC_CONTEXT = b"confide-enrolment-token-v1\x00"
MAX_TOKEN_LIFETIME = _dt.timedelta(days=30)
DEFAULT_CLIENT_VALIDITY = _dt.timedelta(days=365)
_REGISTRY_VERSION = 1  # the format confide.server.ca.empty_registry_json writes


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.UTC).isoformat(timespec="seconds")


_b64 = b64encode


def parse_duration(text: str) -> _dt.timedelta:
    """``90s``, ``30m``, ``24h`` or ``7d`` -> a timedelta in (0, 30 days]."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m:
        raise ConfigError(f"--expires {text!r}: give a number and a unit, e.g. 30m, 24h or 7d")
    value = int(m.group(1))
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
    delta = _dt.timedelta(**{unit: value})
    if delta <= _dt.timedelta(0) or delta > MAX_TOKEN_LIFETIME:
        raise ConfigError(f"--expires {text!r} is out of range; it must be between 1s and 30d")
    return delta


#: an enrolment request is a token, a name and a CSR: well under 4 KiB
MAX_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class EnrolmentRequest:
    """A decoded enrolment request (online POST body or offline request file)."""

    token: str
    csr_pem: bytes
    name: str | None


def parse_enrolment_request(data: bytes | str) -> EnrolmentRequest:
    """Decode an enrolment request from a client; a one-line SecurityError if malformed.

    ``{"token": str, "csr": ASCII PEM str, "name": str or null, ...}`` as
    :func:`confide.client.enrol.enrol_online` sends and ``write_offline_request`` writes.
    The token and the CSR are only checked for shape here; :meth:`EnrolmentAuthority.enrol`
    checks them for real.
    """
    request = decode_json_object(data, what="the enrolment request",
                                 max_bytes=MAX_REQUEST_BYTES)
    token, csr, name = request.get("token"), request.get("csr"), request.get("name")
    if not isinstance(token, str) or not isinstance(csr, str):
        raise SecurityError("the enrolment request lacks its token or CSR")
    if not csr.isascii():
        raise SecurityError("the enrolment request's CSR is not ASCII PEM")
    if name is not None and not (isinstance(name, str) and valid_client_name(name)):
        raise SecurityError("the enrolment request's client name is not valid: use 1-64 "
                            "letters, digits, '.', '_' or '-'")
    return EnrolmentRequest(token=token, csr_pem=csr.encode("ascii"), name=name)


@dataclass
class ClientRecord:
    """An enrolled client."""

    name: str
    serial: str  # hex
    fingerprint: str  # SHA-256 of the certificate, hex
    public_key: str  # SubjectPublicKeyInfo PEM
    enrolled_at: str
    not_after: str
    status: str = "active"  # or "revoked"
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.status == "active"


@dataclass
class TokenRecord:
    """An issued enrolment token (the token itself is never stored)."""

    id: str  # base64url
    name: str | None
    issued_at: str
    expires_at: str
    used_at: str | None = None
    used_by: str | None = None


class Registry:
    """The federation's enrolled clients and issued tokens (``registry.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._cache: tuple[float, int, list[ClientRecord]] | None = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"client registry {str(self.path)!r} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"client registry {str(self.path)!r} is damaged") from None
        if not isinstance(raw, dict) or raw.get("version") != _REGISTRY_VERSION:
            raise ConfigError(f"client registry {str(self.path)!r} has an unknown format")
        return raw

    def _write(self, raw: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(raw, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ reads
    def clients(self) -> list[ClientRecord]:
        """All clients ever enrolled, in enrolment order (cached until the file changes)."""
        st = self.path.stat()
        if self._cache is not None and self._cache[:2] == (st.st_mtime, st.st_size):
            return list(self._cache[2])
        records = [ClientRecord(**c) for c in self._read()["clients"]]
        self._cache = (st.st_mtime, st.st_size, records)
        return list(records)

    def active_clients(self) -> list[ClientRecord]:
        """Clients that are not revoked, in enrolment order."""
        return [c for c in self.clients() if c.active]

    def by_fingerprint(self, fingerprint: str) -> ClientRecord | None:
        """The client holding the certificate with this SHA-256 fingerprint."""
        return next((c for c in self.clients() if c.fingerprint == fingerprint), None)

    def by_public_key(self, pem: bytes) -> ClientRecord | None:
        """The client enrolled with this public key (PEM SubjectPublicKeyInfo)."""
        key = pem.decode("ascii", "replace").strip()
        return next((c for c in self.clients() if c.public_key.strip() == key), None)

    def tokens(self) -> list[TokenRecord]:
        """Every token issued."""
        return [TokenRecord(**t) for t in self._read()["tokens"]]

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock; written only if the block succeeds."""
        with self._locked():
            raw = self._read()
            yield raw
            self._write(raw)
        self._cache = None


@dataclass
class EnrolmentResult:
    """What an enrolled client receives."""

    name: str
    certificate: bytes  # PEM
    ca_certificate: bytes  # PEM
    federation: str

    def to_json(self) -> dict[str, str]:
        """The wire/answer-file form."""
        return {"name": self.name, "certificate": self.certificate.decode("ascii"),
                "ca_certificate": self.ca_certificate.decode("ascii"),
                "federation": self.federation}


class EnrolmentAuthority:
    """Issues tokens, enrols clients from (token, CSR), lists and revokes them."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.registry = Registry(federation.paths.registry)
        try:
            self._token_key = federation.paths.token_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"token key unreadable ({exc})") from None
        if len(self._token_key) < 32:
            raise SecurityError(f"{str(federation.paths.token_key)!r} is too short")

    def _mac(self, tid: bytes, name: str | None, expires_at: str) -> bytes:
        msg = _MAC_CONTEXT + tid + b"\x00" + (name or "").encode() + b"\x00" + expires_at.encode()
        return hmac.new(self._token_key, msg, hashlib.sha256).digest()

    # ------------------------------------------------------------------ tokens
    def issue_token(self, *, name: str | None = None,
                    expires: _dt.timedelta = _dt.timedelta(hours=24)) -> str:
        """A new one-time token; the registry records its id, bound name and expiry only."""
        if name is not None and not valid_client_name(name):
            raise ConfigError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
        if expires <= _dt.timedelta(0) or expires > MAX_TOKEN_LIFETIME:
            raise ConfigError("a token must expire within 30 days")
        tid = secrets.token_bytes(16)
        now = _now()
        record = TokenRecord(id=_b64(tid), name=name, issued_at=_iso(now),
                             expires_at=_iso(now + expires))
        with self.registry.update() as raw:
            if name is not None and any(c["name"] == name for c in raw["clients"]):
                raise ConfigError(f"a client named {name!r} is already enrolled")
            raw["tokens"].append(asdict(record))
        mac = self._mac(tid, name, record.expires_at)
        pin = fingerprint_pin(self.federation.ca.cert)
        return format_token(tid, mac, pin)

    def _check_token(self, raw: dict[str, Any], token: str, now: _dt.datetime) -> dict[str, Any]:
        tid, mac, pin = parse_token(token)
        if not hmac.compare_digest(pin, fingerprint_pin(self.federation.ca.cert)):
            raise SecurityError("the enrolment token belongs to another federation")
        record = next((t for t in raw["tokens"] if t["id"] == _b64(tid)), None)
        expected = self._mac(tid, record["name"] if record else None,
                             record["expires_at"] if record else "")
        # Constant-time comparison (RFC 2104, Sec. 5 discussion of MAC verification).
        if record is None or not hmac.compare_digest(mac, expected):
            raise SecurityError("the enrolment token is not valid (unknown or forged)")
        if record["used_at"] is not None:
            raise SecurityError("the enrolment token was already used; tokens are one-time, "
                                "ask the coordinator's operator for a new one")
        if now >= _dt.datetime.fromisoformat(record["expires_at"]):
            raise SecurityError(f"the enrolment token expired at {record['expires_at']}; ask "
                                "for a new one")
        return record

    # ------------------------------------------------------------------ enrolment
    def enrol(self, *, token: str, csr_pem: bytes, requested_name: str | None = None,
              validity: _dt.timedelta = DEFAULT_CLIENT_VALIDITY) -> EnrolmentResult:
        """Check the token and CSR, issue the client certificate, consume the token.

        All checks and the registry update happen under one lock, so a token enrols at most
        one client even when requests race.
        """
        csr = load_csr(csr_pem)  # key type and self-signature (RFC 2986), SecurityError
        now = _now()
        with self.registry.update() as raw:
            record = self._check_token(raw, token, now)
            name = record["name"] or requested_name
            if name is None:
                name = f"client-{len(raw['clients']) + 1}"
            if record["name"] is not None and requested_name not in (None, record["name"]):
                raise SecurityError(f"this token enrols the client {record['name']!r}, not "
                                    f"{requested_name!r}")
            if not valid_client_name(name):
                raise ConfigError(f"client name {name!r}: use 1-64 letters, digits, '.', '_' "
                                  "or '-'")
            if any(c["name"] == name for c in raw["clients"]):
                raise SecurityError(f"a client named {name!r} is already enrolled; choose "
                                    "another name")
            key_pem = public_key_pem(csr.public_key()).decode("ascii")  # type: ignore[arg-type]
            if any(c["public_key"].strip() == key_pem.strip() for c in raw["clients"]):
                raise SecurityError("this public key is already enrolled; every client "
                                    "creates its own key")
            cert = self.federation.ca.issue_client(csr=csr, name=name, validity=validity)
            raw["clients"].append(asdict(ClientRecord(
                name=name, serial=format(cert.serial_number, "x"),
                fingerprint=certificate_fingerprint(cert), public_key=key_pem,
                enrolled_at=_iso(now), not_after=_iso(cert.not_valid_after_utc))))
            record["used_at"] = _iso(now)
            record["used_by"] = name
        return EnrolmentResult(
            name=name, certificate=cert.public_bytes(serialization.Encoding.PEM),
            ca_certificate=self.federation.ca_pem(), federation=self.federation.federation_id)

    # ------------------------------------------------------------------ revocation
    def revoke(self, name: str) -> ClientRecord:
        """Revoke ``name``: registry status and a new CRL (new connections are refused)."""
        now = _now()
        with self.registry.update() as raw:
            entry = next((c for c in raw["clients"] if c["name"] == name), None)
            if entry is None:
                known = ", ".join(c["name"] for c in raw["clients"]) or "none"
                raise ConfigError(f"no client named {name!r} is enrolled (enrolled: {known})")
            if entry["status"] == "revoked":
                raise ConfigError(f"client {name!r} is already revoked")
            entry["status"] = "revoked"
            entry["revoked_at"] = _iso(now)
            revoked = [(int(c["serial"], 16), _dt.datetime.fromisoformat(c["revoked_at"]))
                       for c in raw["clients"] if c["status"] == "revoked"]
            # The CRL is written inside the lock, before the registry, so a reader never
            # sees a revoked registry entry whose certificate still passes the handshake.
            write_crl(self.federation.paths, self.federation.ca, revoked)
        return ClientRecord(**entry)

    def refresh_crl(self) -> None:
        """Rewrite the CRL from the registry (its next-update time moves forward)."""
        with self.registry.update() as raw:
            revoked = [(int(c["serial"], 16), _dt.datetime.fromisoformat(c["revoked_at"]))
                       for c in raw["clients"] if c["status"] == "revoked"]
            write_crl(self.federation.paths, self.federation.ca, revoked)
