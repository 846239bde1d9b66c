"""The throwaway CA: certificates a TLS peer accepts, identities where mTLS reads them, keys kept private."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from supervisor_service.security.certs import Authority, write_bundle


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_a_client_certificate_names_its_identity_first_and_is_signed_by_the_ca():
    ca = Authority()
    cert = _load(ca.client("datanode-7").cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["datanode-7"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "datanode-7"
    ca_cert = _load(ca.cert_pem)
    assert cert.issuer == ca_cert.subject
    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca_cert)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_server_certificate_names_localhost_and_loopback_and_serves_both_ways():
    cert = _load(Authority().server("supervisor-0.example").cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["supervisor-0.example", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_certificates_of_two_authorities_do_not_verify_against_each_other():
    one, other = Authority(), Authority()
    with pytest.raises(InvalidSignature):
        _load(one.client("x").cert_pem).verify_directly_issued_by(_load(other.cert_pem))


def test_validity_starts_a_little_in_the_past_and_can_be_set():
    now = dt.datetime.now(dt.UTC)
    cert = _load(Authority().client("x", days=1).cert_pem)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc <= now + dt.timedelta(days=1)
    expired = _load(Authority().client("x", days=1, valid_from=now - dt.timedelta(days=3)).cert_pem)
    assert expired.not_valid_after_utc < now


def test_a_certificate_needs_a_name():
    with pytest.raises(ValueError, match="at least one name"):
        Authority().client("")


def test_the_bundle_has_every_identity_and_private_keys(tmp_path):
    files = write_bundle(tmp_path / "certs", datanodes=2, operators=("alice", "bob"))
    assert set(files) == {f"{n}{s}" for n in ("ca", "server", "datanode-1", "datanode-2", "metasrv",
                                              "ops-alice", "ops-bob", "admin") for s in ("", "-key")}
    for name, path in files.items():
        assert path.read_bytes().startswith(b"-----BEGIN ")
        if name.endswith("-key"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    ca = _load(files["ca"].read_bytes())
    _load(files["ops-bob"].read_bytes()).verify_directly_issued_by(ca)


def test_a_negative_count_of_datanodes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="datanodes must be 0 or more"):
        write_bundle(tmp_path, datanodes=-1)
