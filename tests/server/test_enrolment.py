"""Enrolment tokens (one-time, expiring, unforgeable), the registry and revocation."""

from __future__ import annotations

import base64
import datetime as dt
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import confide.server.enrolment as enrolment
from confide.exceptions import ConfigError, SecurityError
from confide.pki import fingerprint_pin, parse_token
from confide.server.ca import init_federation, load_federation
from confide.server.enrolment import EnrolmentAuthority, parse_duration
from confide.server.gateway import read_crl_serials


def _csr_pem(key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def authority(tmp_path):
    init_federation(tmp_path / "fed", name="t", hosts=["127.0.0.1"])
    return EnrolmentAuthority(load_federation(tmp_path / "fed"))


@pytest.fixture(scope="module")
def shared_authority(tmp_path_factory):
    root = tmp_path_factory.mktemp("enrol") / "fed"
    init_federation(root, name="t", hosts=["127.0.0.1"])
    return EnrolmentAuthority(load_federation(root))


def test_token_enrols_once(authority):
    token = authority.issue_token(name="alice")
    result = authority.enrol(token=token, csr_pem=_csr_pem())
    assert result.name == "alice"
    assert [c.name for c in authority.registry.active_clients()] == ["alice"]
    with pytest.raises(SecurityError, match="already used"):
        authority.enrol(token=token, csr_pem=_csr_pem())
    used = authority.registry.tokens()[0]
    assert used.used_by == "alice" and used.used_at is not None


def test_expired_token_refused(authority, monkeypatch):
    token = authority.issue_token(expires=dt.timedelta(minutes=5))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
    monkeypatch.setattr(enrolment, "_now", lambda: later)
    with pytest.raises(SecurityError, match="expired"):
        authority.enrol(token=token, csr_pem=_csr_pem())
    assert authority.registry.clients() == []


def test_forged_token_refused(authority):
    real = authority.issue_token(name="bob")
    prefix, tid, mac, pin = real.split(".")
    forged_mac = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    with pytest.raises(SecurityError, match="forged"):
        authority.enrol(token=f"{prefix}.{tid}.{forged_mac}.{pin}", csr_pem=_csr_pem())
    unknown_id = base64.urlsafe_b64encode(bytes(16)).rstrip(b"=").decode()
    with pytest.raises(SecurityError, match="unknown or forged"):
        authority.enrol(token=f"{prefix}.{unknown_id}.{mac}.{pin}", csr_pem=_csr_pem())
    # the genuine token still works afterwards
    assert authority.enrol(token=real, csr_pem=_csr_pem()).name == "bob"


def test_editing_a_token_record_invalidates_it(authority):
    """The MAC covers the record's expiry and name: stretching the expiry in the registry
    (without the token key) does not make a token usable."""
    token = authority.issue_token(name="carol", expires=dt.timedelta(minutes=1))
    with authority.registry.update() as raw:
        raw["tokens"][0]["expires_at"] = "2099-01-01T00:00:00+00:00"
    with pytest.raises(SecurityError, match="forged"):
        authority.enrol(token=token, csr_pem=_csr_pem())


def test_token_from_another_federation_refused(authority, shared_authority):
    token = shared_authority.issue_token()
    with pytest.raises(SecurityError, match="another federation"):
        authority.enrol(token=token, csr_pem=_csr_pem())


def test_csr_with_bad_signature_refused(authority):
    token = authority.issue_token()
    pem = _csr_pem()
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(SecurityError, match="signature"):
        authority.enrol(token=token, csr_pem=tampered)
    assert authority.registry.tokens()[0].used_at is None  # a failed enrolment keeps the token


def test_same_key_and_name_cannot_enrol_twice(authority):
    key = ec.generate_private_key(ec.SECP256R1())
    authority.enrol(token=authority.issue_token(name="dave"), csr_pem=_csr_pem(key))
    with pytest.raises(SecurityError, match="already enrolled"):
        authority.enrol(token=authority.issue_token(), csr_pem=_csr_pem(key))
    with pytest.raises(ConfigError, match="already enrolled"):
        authority.issue_token(name="dave")


def test_racing_enrolments_use_a_token_once(authority):
    token = authority.issue_token()
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            authority.enrol(token=token, csr_pem=_csr_pem())
            outcomes.append("ok")
        except SecurityError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 5
    assert len(authority.registry.clients()) == 1


def test_revocation_updates_registry_and_crl(authority):
    authority.enrol(token=authority.issue_token(name="erin"), csr_pem=_csr_pem())
    record = authority.revoke("erin")
    assert record.status == "revoked"
    assert authority.registry.active_clients() == []
    assert read_crl_serials(authority.federation.paths.crl) == {int(record.serial, 16)}
    with pytest.raises(ConfigError, match="already revoked"):
        authority.revoke("erin")
    with pytest.raises(ConfigError, match="no client named"):
        authority.revoke("nobody")


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "31d", "-1h", "1w"])
def test_bad_durations(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_durations():
    assert parse_duration("90s") == dt.timedelta(seconds=90)
    assert parse_duration("24h") == dt.timedelta(hours=24)
    assert parse_duration("30d") == dt.timedelta(days=30)


# ----------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_altered_token_is_refused(shared_authority, data):
    """Changing any one character of a valid token never yields a usable token."""
    token = shared_authority.issue_token()
    i = data.draw(st.integers(0, len(token) - 1), label="position")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    c = data.draw(st.sampled_from([a for a in alphabet if a != token[i]]), label="char")
    altered = token[:i] + c + token[i + 1:]
    try:
        parse_token(altered)
    except SecurityError:
        return  # malformed: refused before any lookup
    # Well-formed alterations can only differ in id, mac or pin bits that matter, except
    # for base64 padding bits of the last character of a field, which decode identically.
    if parse_token(altered) == parse_token(token):
        return
    with pytest.raises(SecurityError):
        shared_authority.enrol(token=altered, csr_pem=_csr_pem())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tid=st.binary(min_size=16, max_size=16), mac=st.binary(min_size=32, max_size=32))
def test_random_tokens_never_enrol(shared_authority, tid, mac):
    """Without the token key, guessing (id, MAC) pairs never succeeds."""

    pin = fingerprint_pin(shared_authority.federation.ca.cert)

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    with pytest.raises(SecurityError):
        shared_authority.enrol(token=f"cfd1.{b64(tid)}.{b64(mac)}.{b64(pin)}",
                               csr_pem=_csr_pem())
