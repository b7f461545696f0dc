"""The federation CA: folder creation, certificate profiles, CRL."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from confide.exceptions import ConfigError, SecurityError
from confide.pki import load_certificate
from confide.server.ca import CertificateAuthority, init_federation, load_federation
from confide.server.gateway import read_crl_serials


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ca") / "fed"
    init_federation(root, name="test", hosts=["localhost", "127.0.0.1", "coord.example.org"])
    return load_federation(root)


def _csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key,
                                                                             hashes.SHA256())


def test_folder_holds_private_keys_readable_by_owner_only(federation):
    p = federation.paths
    for key in (p.ca_key, p.server_key, p.link_key, p.token_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(p.root.stat().st_mode) == 0o700


def test_server_certificate_profile(federation):
    cert = load_certificate(federation.paths.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coord.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert federation.ca.verify_issued(cert)
    link = load_certificate(federation.paths.link_cert)
    link_san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in link_san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_ca_signs_leaves_only(federation):
    bc = federation.ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0


def test_client_certificate_from_csr(federation):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = federation.ca.issue_client(csr=_csr(key), name="alice",
                                      validity=dt.timedelta(days=30))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    assert federation.ca.verify_issued(cert)


def test_client_key_must_be_a_nist_ec_key(federation):
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(SecurityError, match="P-256"):
        federation.ca.issue_client(csr=_csr(key), name="bob", validity=dt.timedelta(days=1))


def test_crl_lists_revoked_serials(federation):
    crl = federation.ca.crl([(1234, dt.datetime.now(dt.UTC))])
    assert [r.serial_number for r in crl] == [1234]
    assert crl.is_signature_valid(federation.ca.key.public_key())
    assert read_crl_serials(federation.paths.crl) == set()  # a new federation revokes nobody


def test_other_ca_does_not_verify(federation):
    other = CertificateAuthority.create(federation_name="other", federation_id="x")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = other.issue_client(csr=_csr(key), name="mallory", validity=dt.timedelta(days=1))
    assert not federation.ca.verify_issued(cert)


def test_init_refuses_existing_folder_and_bad_hosts(tmp_path):
    root = tmp_path / "fed"
    root.mkdir()
    (root / "something").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        init_federation(root, name="x", hosts=["localhost"])
    with pytest.raises(ConfigError, match="neither an IP"):
        init_federation(tmp_path / "new", name="x", hosts=["not a host!"])
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]  # nothing half-written


def test_load_names_what_is_missing(tmp_path, federation):
    with pytest.raises(ConfigError, match="not found"):
        load_federation(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in federation.paths.root.iterdir():
        if f.name != "ca.key":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="ca.key is missing"):
        load_federation(broken)
