"""The shared PKI helpers: CSR checks, certificate and JSON decoding, token format."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from confide.exceptions import SecurityError
from confide.pki import (
    decode_json_object,
    format_token,
    load_csr,
    make_csr,
    parse_certificate,
    parse_token,
)


def _csr(key) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")]))
           .sign(key, algorithm))
    return csr.public_bytes(serialization.Encoding.PEM)


def test_a_p256_csr_is_accepted():
    key = ec.generate_private_key(ec.SECP256R1())
    assert load_csr(make_csr(key, "silo")).public_key().public_numbers() == \
        key.public_key().public_numbers()


@pytest.mark.parametrize("key", [
    rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ed25519.Ed25519PrivateKey.generate(),
    ec.generate_private_key(ec.SECP256K1()),
], ids=["rsa", "ed25519", "secp256k1"])
def test_other_key_types_are_refused(key):
    with pytest.raises(SecurityError, match="ECDSA P-256"):
        load_csr(_csr(key))


@pytest.mark.parametrize("pem", [b"", b"-----BEGIN CERTIFICATE REQUEST-----\n", "text",
                                 b"x" * 20000])
def test_non_csrs_are_refused(pem):
    with pytest.raises(SecurityError):
        load_csr(pem)


def test_a_certificate_with_a_non_positive_serial_is_refused():
    """RFC 5280, Sec. 4.1.2.2: serials are positive; cryptography only warns, we refuse."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    now = dt.datetime.now(dt.UTC)
    good = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = good.public_bytes(serialization.Encoding.PEM)
    assert parse_certificate(pem, what="the CA").serial_number == 1
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    i = der.index(bytes([0x02, 0x01, 0x01]))  # INTEGER 1, the serial
    der[i + 2] = 0x00
    zero = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der))
            + b"-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityError, match="the CA is not a valid PEM certificate"):
        parse_certificate(zero, what="the CA")


@pytest.mark.parametrize("data", [b"[" * 100000, b"\xff", b"[]", b"1" * 5000, "\ud800",
                                  b"{" * 10 + b"}" * 10, b"x" * 1025])
def test_json_decoding_is_one_security_error(data):
    with pytest.raises(SecurityError, match="the request"):
        decode_json_object(data, what="the request", max_bytes=1024)


def test_token_format_round_trips():
    tid, mac, pin = bytes(range(16)), bytes(range(32)), bytes(range(16, 32))
    assert parse_token(format_token(tid, mac, pin)) == (tid, mac, pin)
    assert parse_token(" " + format_token(tid, mac, pin) + "\n") == (tid, mac, pin)
