"""Keys, certificates, CSRs and enrolment tokens: what the coordinator and clients share.

The coordinator's CA (:mod:`confide.server.ca`), its enrolment authority
(:mod:`confide.server.enrolment`) and the client's enrolment (:mod:`confide.client.enrol`)
all read and write the same formats; they live here, on the ground floor, so the client never
imports the server.

A token is ``cfd1.<id>.<mac>.<pin>`` (base64url fields without padding): a 16-byte id, a
32-byte HMAC-SHA256 tag (RFC 2104) and the 16-byte CA pin (:func:`fingerprint_pin`). Every
decoder of bytes from the other side (tokens, CSRs, JSON enrolment messages) raises
:class:`~confide.exceptions.SecurityError` with one line and nothing else.

Everything is built with ``cryptography``; nothing here is seeded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from confide.exceptions import SecurityError

__all__ = [
    "CURVE",
    "CLIENT_NAME_PATTERN",
    "TOKEN_PREFIX",
    "valid_client_name",
    "write_private_key",
    "load_private_key",
    "load_certificate",
    "parse_certificate",
    "certificate_fingerprint",
    "fingerprint_pin",
    "public_key_pem",
    "same_public_key",
    "make_csr",
    "load_csr",
    "check_csr",
    "format_token",
    "parse_token",
    "decode_json_object",
    "b64encode",
    "X509_PARSE_ERRORS",
]

#: ECDSA P-256 with SHA-256 everywhere: accepted by TLS 1.3 (RFC 8446, Sec. 4.2.3) and by
#: Flower's node authentication, which requires a NIST curve key.
CURVE = ec.SECP256R1
CLIENT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_RE = re.compile(CLIENT_NAME_PATTERN)
TOKEN_PREFIX = "cfd1"  # noqa: S105 - a format tag, not a secret
#: a token is about 130 characters; anything much longer is not one
_MAX_TOKEN_CHARS = 512
#: a P-256 CSR in PEM is about 450 bytes; a P-521 one under 1 KiB
_MAX_CSR_BYTES = 16 * 1024
#: what ``cryptography`` raises for X.509/PKCS #10 input it cannot parse: ValueError for bad
#: DER/PEM, InvalidVersion (not a ValueError) for an unknown version field, UnsupportedAlgorithm
#: for a key or signature algorithm it does not implement
X509_PARSE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, UnsupportedAlgorithm,
                                                  x509.InvalidVersion)
_CERTIFICATE_ERRORS: tuple[type[Exception], ...] = (*X509_PARSE_ERRORS,
                                                    CryptographyDeprecationWarning)


def valid_client_name(name: str) -> bool:
    """Whether ``name`` is a usable client name (letters, digits, ``._-``; 1-64 chars)."""
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name))


# --------------------------------------------------------------------------- key/cert I/O


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM readable by the owner only (mode 0600)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key (PEM), raising SecurityError with one line on any problem."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SecurityError(f"private key {str(path)!r} not found") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SecurityError(f"private key {str(path)!r} is not a readable PEM key ({exc})"
                            ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"private key {str(path)!r} is not an elliptic-curve key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    """Load a PEM certificate, raising SecurityError with one line on any problem."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise SecurityError(f"certificate {str(path)!r} not found") from None
    except X509_PARSE_ERRORS as exc:
        raise SecurityError(f"certificate {str(path)!r} is not a readable PEM certificate "
                            f"({exc})") from None


def parse_certificate(pem: bytes, *, what: str) -> x509.Certificate:
    """A PEM certificate from the other side, or a one-line SecurityError naming ``what``.

    A certificate ``cryptography`` parses only with a deprecation warning (a serial number
    that is not positive, against RFC 5280, Sec. 4.1.2.2) is refused too: a Confide CA never
    issues one, and later ``cryptography`` releases refuse it themselves.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_pem_x509_certificate(pem)
            cert.public_key()
    except _CERTIFICATE_ERRORS:
        raise SecurityError(f"{what} is not a valid PEM certificate") from None
    return cert


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_pin(cert: x509.Certificate) -> bytes:
    """The first 16 bytes of the CA's SHA-256 fingerprint: what an enrolment token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()[:16]


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM: the encoding Flower's node authentication uses."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def same_public_key(a: object, b: object) -> bool:
    """Whether two public keys are the same key (compared by their DER encoding)."""
    def der(k: object) -> bytes | None:
        if not isinstance(k, ec.EllipticCurvePublicKey):
            return None
        return k.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    da, db = der(a), der(b)
    return da is not None and da == db


# --------------------------------------------------------------------------- CSRs


def make_csr(key: ec.EllipticCurvePrivateKey, name: str | None) -> bytes:
    """A PKCS #10 request (RFC 2986) for ``key``, PEM; only this leaves the client."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name or "confide-client")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a client's PEM CSR and check it with :func:`check_csr`.

    Every failure (oversized, not PEM, an algorithm ``cryptography`` does not support, a bad
    signature) is a one-line SecurityError.
    """
    if not isinstance(pem, bytes) or len(pem) > _MAX_CSR_BYTES:
        raise SecurityError("the certificate signing request is missing or oversized")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except X509_PARSE_ERRORS:
        raise SecurityError("the certificate signing request is not a valid PEM CSR") from None
    check_csr(csr)
    return csr


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's public key, if it is ECDSA P-256/384/521 and the self-signature is valid."""
    try:
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
                public_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
            raise SecurityError("the client key must be an ECDSA P-256, P-384 or P-521 key")
        # PKCS #10 (RFC 2986, Sec. 4.2): the request is signed with the private key of the
        # public key it carries, which proves the client holds that key.
        signature_ok = csr.is_signature_valid
    except X509_PARSE_ERRORS:
        raise SecurityError("the certificate signing request is not a valid PEM CSR") from None
    if not signature_ok:
        raise SecurityError("the certificate signing request's signature is invalid")
    return public_key


# --------------------------------------------------------------------------- tokens


def b64encode(data: bytes) -> str:
    """base64url without padding (RFC 4648, Sec. 5), as tokens and registry ids use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # validate=True: characters outside the base64url alphabet are an error, not skipped
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def format_token(tid: bytes, mac: bytes, pin: bytes) -> str:
    """``cfd1.<id>.<mac>.<pin>``."""
    return ".".join([TOKEN_PREFIX, b64encode(tid), b64encode(mac), b64encode(pin)])


def parse_token(token: str) -> tuple[bytes, bytes, bytes]:
    """Split a token into ``(id, mac, ca_pin)``; SecurityError if it is malformed."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        raise SecurityError("the enrolment token is malformed (not a token string)")
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        raise SecurityError("the enrolment token is malformed (expected cfd1.<id>.<mac>.<pin>"
                            "); copy it exactly as 'confide enrol token' printed it")
    try:
        tid, mac, pin = (_b64decode(p) for p in parts[1:])
    except (binascii.Error, ValueError):
        raise SecurityError("the enrolment token is malformed (bad base64)") from None
    if len(tid) != 16 or len(mac) != 32 or len(pin) != 16:
        raise SecurityError("the enrolment token is malformed (wrong field lengths)")
    return tid, mac, pin


# --------------------------------------------------------------------------- JSON messages


def decode_json_object(data: bytes | str, *, what: str, max_bytes: int) -> dict[str, Any]:
    """A JSON object from the other side, or a one-line SecurityError naming ``what``.

    Bounded before parsing; deep nesting (``RecursionError`` in ``json``), bad UTF-8, lone
    surrogates and huge integers (``ValueError``) are all converted here.
    """
    if not isinstance(data, bytes | str) or len(data) > max_bytes:
        raise SecurityError(f"{what} is missing or larger than {max_bytes} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeError, RecursionError):
        raise SecurityError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise SecurityError(f"{what} is not a JSON object")
    return value
