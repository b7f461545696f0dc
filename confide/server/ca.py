"""The federation's certificate authority: X.509 keys, certificates and the revocation list.

``confide ca init DIR`` creates a federation folder (:class:`FederationPaths`): an ECDSA P-256
CA, the coordinator's TLS certificate for the host names it is reached at, a loopback
certificate for the SuperLink behind the gateway, the enrolment-token key, an empty client
registry and an empty CRL. Client certificates are issued from certificate signing requests
(the private key never leaves the client) and revoked by listing their serial in the CRL
(RFC 5280, Sec. 5), which the gateway loads for every new TLS connection.

The key, certificate and CSR helpers the client needs too live in :mod:`confide.pki` (and
are re-exported here). Everything is built with ``cryptography``; nothing here is seeded:
keys, serials and secrets come from the operating system's CSPRNG (``os.urandom`` via
``cryptography`` and ``secrets``).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.exceptions import ConfigError, SecurityError
from confide.pki import (
    CLIENT_NAME_PATTERN,
    CURVE,
    certificate_fingerprint,
    check_csr,
    fingerprint_pin,
    load_certificate,
    load_private_key,
    public_key_pem,
    same_public_key,
    valid_client_name,
    write_private_key,
)

__all__ = [
    "FederationPaths",
    "CertificateAuthority",
    "init_federation",
    "load_federation",
    "certificate_fingerprint",
    "public_key_pem",
    "same_public_key",
    "load_certificate",
    "load_private_key",
    "write_private_key",
    "valid_client_name",
    "CLIENT_NAME_PATTERN",
    "CURVE",
    "fingerprint_pin",
    "empty_registry_json",
    "write_crl",
    "Federation",
]

CA_VALIDITY = _dt.timedelta(days=3650)
SERVER_VALIDITY = _dt.timedelta(days=825)
CRL_VALIDITY = _dt.timedelta(days=365)
_REGISTRY_VERSION = 1


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass(frozen=True)
class FederationPaths:
    """The files of a federation folder (the operator's side; keep it private)."""

    root: Path

    @property
    def ca_cert(self) -> Path:  # noqa: D102
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:  # noqa: D102
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:  # noqa: D102
        return self.root / "coordinator.pem"

    @property
    def server_key(self) -> Path:  # noqa: D102
        return self.root / "coordinator.key"

    @property
    def link_cert(self) -> Path:  # noqa: D102
        return self.root / "superlink.pem"

    @property
    def link_key(self) -> Path:  # noqa: D102
        return self.root / "superlink.key"

    @property
    def token_key(self) -> Path:  # noqa: D102
        return self.root / "tokens.key"

    @property
    def registry(self) -> Path:  # noqa: D102
        return self.root / "registry.json"

    @property
    def crl(self) -> Path:  # noqa: D102
        return self.root / "crl.pem"

    @property
    def manifest(self) -> Path:  # noqa: D102
        return self.root / "federation.toml"

    def required(self) -> list[Path]:
        """Files a complete federation folder holds."""
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.link_cert,
                self.link_key, self.token_key, self.registry, self.crl, self.manifest]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    out = []
    for host in hosts:
        h = host.strip()
        if not h:
            raise ConfigError("--host must not be empty")
        try:
            ipaddress.ip_address(h)
        except ValueError:
            if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]*[A-Za-z0-9])?"
                                r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", h):
                raise ConfigError(f"--host {h!r} is neither an IP address nor a DNS name"
                                  ) from None
        out.append(h)
    if not out:
        raise ConfigError("give at least one --host the coordinator is reached at")
    return out


# --------------------------------------------------------------------------- the CA


class CertificateAuthority:
    """Issues server and client certificates and the CRL, with the federation's CA key."""

    def __init__(self, *, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if not same_public_key(cert.public_key(), key.public_key()):
            raise SecurityError("the CA key does not belong to the CA certificate")
        self.cert = cert
        self.key = key

    @classmethod
    def create(cls, *, federation_name: str, federation_id: str) -> CertificateAuthority:
        """A new self-signed CA (path length 0: it signs leaf certificates only)."""
        key = ec.generate_private_key(CURVE())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"federation {federation_id}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation_name} CA"),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            # RFC 5280, Sec. 4.2.1.9 and 4.2.1.3: a CA that signs only end-entity certs/CRLs.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate (identifies the federation)."""
        return certificate_fingerprint(self.cert)

    def _leaf(self, *, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
              validity: _dt.timedelta, usage: x509.ObjectIdentifier,
              hosts: Sequence[str] = ()) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(min(now + validity, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            # RFC 5280, Sec. 4.2.1.12: a client certificate cannot serve as a server's and
            # vice versa; OpenSSL checks the purpose during the handshake.
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(self, *, public_key: ec.EllipticCurvePublicKey, hosts: Sequence[str],
                     common_name: str) -> x509.Certificate:
        """A TLS server certificate valid for ``hosts`` (RFC 6125 name checks use the SAN)."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return self._leaf(subject=subject, public_key=public_key, validity=SERVER_VALIDITY,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=hosts)

    def issue_client(self, *, csr: x509.CertificateSigningRequest, name: str,
                     validity: _dt.timedelta) -> x509.Certificate:
        """A TLS client certificate for ``name`` from a CSR that passes :func:`check_csr`."""
        public_key = check_csr(csr)  # key type and RFC 2986 self-signature
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        return self._leaf(subject=subject, public_key=public_key, validity=validity,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    def crl(self, revoked: Iterable[tuple[int, _dt.datetime]]) -> x509.CertificateRevocationList:
        """A CRL listing ``(serial, revoked_at)`` pairs (RFC 5280, Sec. 5)."""
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.cert.subject)
                   .last_update(now - _dt.timedelta(minutes=5))
                   .next_update(now + CRL_VALIDITY))
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(when).build())
        return builder.sign(self.key, hashes.SHA256())

    def verify_issued(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` was signed by this CA."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


# --------------------------------------------------------------------------- the folder


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def empty_registry_json() -> str:
    """The client registry of a new federation (kept by :mod:`confide.server.enrolment`)."""
    return json.dumps({"version": _REGISTRY_VERSION, "clients": [], "tokens": []}, indent=2)


def write_crl(paths: FederationPaths, ca: CertificateAuthority,
              revoked: Iterable[tuple[int, _dt.datetime]]) -> None:
    """Atomically replace the federation's CRL."""
    crl = ca.crl(revoked)
    _atomic_write(paths.crl, crl.public_bytes(serialization.Encoding.PEM))


def init_federation(directory: str | Path, *, name: str, hosts: Sequence[str]) -> FederationPaths:
    """Create a federation folder; nothing is left behind if any step fails."""
    root = Path(directory)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{str(root)!r} already exists and is not empty; choose a new folder "
                          "(a federation folder is created once)")
    hosts = _check_hosts(hosts)
    if not name.strip():
        raise ConfigError("--name must not be empty")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.init-"))
    try:
        os.chmod(staging, 0o700)
        paths = FederationPaths(staging)
        federation_id = secrets.token_hex(8)
        ca = CertificateAuthority.create(federation_name=name, federation_id=federation_id)
        write_private_key(paths.ca_key, ca.key)
        paths.ca_cert.write_bytes(_pem(ca.cert))
        server_key = ec.generate_private_key(CURVE())
        write_private_key(paths.server_key, server_key)
        paths.server_cert.write_bytes(_pem(ca.issue_server(
            public_key=server_key.public_key(), hosts=hosts, common_name=f"{name} coordinator")))
        link_key = ec.generate_private_key(CURVE())
        write_private_key(paths.link_key, link_key)
        paths.link_cert.write_bytes(_pem(ca.issue_server(
            public_key=link_key.public_key(), hosts=["127.0.0.1", "localhost"],
            common_name=f"{name} superlink (loopback only)")))
        fd = os.open(paths.token_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        paths.registry.write_text(empty_registry_json(), encoding="utf-8")
        write_crl(paths, ca, [])
        paths.manifest.write_text(tomli_w.dumps({
            "federation": {"name": name, "id": federation_id, "hosts": list(hosts),
                           "ca_fingerprint": ca.fingerprint,
                           "created": _now().isoformat(timespec="seconds")}}),
            encoding="utf-8")
        if root.exists():
            root.rmdir()
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FederationPaths(root)


@dataclass
class Federation:
    """A loaded federation folder: its paths, CA and manifest."""

    paths: FederationPaths
    ca: CertificateAuthority
    name: str
    federation_id: str
    hosts: list[str]

    def ca_pem(self) -> bytes:
        """The CA certificate (public)."""
        return _pem(self.ca.cert)


def load_federation(directory: str | Path) -> Federation:
    """Load and check a federation folder, with a one-line error naming what is wrong."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"federation folder {str(root)!r} not found; create it with "
                          "'confide ca init DIR'")
    paths = FederationPaths(root)
    missing = [p.name for p in paths.required() if not p.is_file()]
    if missing:
        raise ConfigError(f"{str(root)!r} is not a complete federation folder ({missing[0]} is "
                          "missing); was it created with 'confide ca init'?")
    try:
        manifest = tomllib.loads(paths.manifest.read_text(encoding="utf-8"))["federation"]
        name, fid, hosts = str(manifest["name"]), str(manifest["id"]), list(manifest["hosts"])
    except (tomllib.TOMLDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"{str(paths.manifest)!r} is damaged") from None
    ca = CertificateAuthority(cert=load_certificate(paths.ca_cert),
                              key=load_private_key(paths.ca_key))
    for cert_path in (paths.server_cert, paths.link_cert):
        if not ca.verify_issued(load_certificate(cert_path)):
            raise SecurityError(f"{str(cert_path)!r} was not issued by this federation's CA")
    return Federation(paths=paths, ca=ca, name=name, federation_id=fid, hosts=hosts)
