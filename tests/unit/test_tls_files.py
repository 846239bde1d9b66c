"""TLS files: what loads, what is refused with a message naming the file, and a rotation that keeps
the set in force when the new files are bad."""

from __future__ import annotations

import os

import pytest

from supervisor_service.security.certs import Authority
from supervisor_service.security.tls import ClientTLS, ServerCertificates, TLSFileError, read_ca, read_pair


def test_a_matching_pair_loads(cert_files):
    cert, key = read_pair(cert_files["server"], cert_files["server-key"])
    assert b"BEGIN CERTIFICATE" in cert and b"PRIVATE KEY" in key


def test_a_key_of_another_certificate_is_refused_naming_both_files(cert_files):
    with pytest.raises(TLSFileError, match="does not match") as err:
        read_pair(cert_files["server"], cert_files["admin-key"])
    assert str(cert_files["admin-key"]) in str(err.value) and str(cert_files["server"]) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                                     b"\x00" * 100, b"-" * (1024 * 1024 + 10)])
def test_garbage_is_not_a_certificate(tmp_path, content):
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(TLSFileError, match=str(path)):
        read_ca(path)


def test_a_missing_or_unreadable_file_says_which(tmp_path, cert_files):
    with pytest.raises(TLSFileError, match="cannot be read"):
        read_pair(tmp_path / "nope.pem", cert_files["server-key"])
    with pytest.raises(TLSFileError, match="cannot be read"):
        read_ca(tmp_path)  # a directory


def test_a_half_written_key_is_refused(tmp_path, cert_files):
    half = tmp_path / "half-key.pem"
    half.write_bytes(cert_files["server-key"].read_bytes()[:60])
    with pytest.raises(TLSFileError, match="private key"):
        read_pair(cert_files["server"], half)


def test_client_tls_half_given_is_an_error_naming_the_setting(cert_files):
    with pytest.raises(TLSFileError, match="SUPERVISOR_REMOTE_TLS.*without its key"):
        ClientTLS(ca_file=str(cert_files["ca"]), cert_file=str(cert_files["metasrv"])).check("SUPERVISOR_REMOTE_TLS_*")
    ClientTLS(ca_file=str(cert_files["ca"]), cert_file=str(cert_files["metasrv"]),
              key_file=str(cert_files["metasrv-key"])).check()


def _replace(path, data: bytes, bump: int = 0) -> None:
    path.write_bytes(data)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump))  # mtime granularity: make the change visible


def test_rotation_keeps_the_old_set_until_a_good_new_one_is_on_disk(tmp_path, cert_files):
    outcomes: list[str] = []
    certs = ServerCertificates(str(cert_files["server"]), str(cert_files["server-key"]), str(cert_files["ca"]),
                               on_reload=outcomes.append)
    assert certs.fetch() is None  # nothing changed: nothing re-read
    fresh = Authority().server("region-supervisor")
    # A certificate written before its key: the pair does not match, the old set stays.
    _replace(cert_files["server"], fresh.cert_pem, 1_000_000)
    assert certs.fetch() is None
    assert certs.fetch() is None  # refused once, not again per handshake
    assert outcomes == ["rejected"]
    _replace(cert_files["server-key"], fresh.key_pem, 1_000_000)
    assert certs.fetch() is not None
    assert outcomes == ["rejected", "reloaded"]
    assert certs.fetch() is None
    # The CA file removed: refused, the set in force stays.
    os.unlink(cert_files["ca"])
    assert certs.fetch() is None
    assert outcomes[-1] == "rejected"


def test_fetch_never_raises_whatever_is_on_disk(tmp_path, cert_files):
    certs = ServerCertificates(str(cert_files["server"]), str(cert_files["server-key"]))
    for garbage in (b"", b"\xff" * 5000, cert_files["ca-key"].read_bytes()):
        _replace(cert_files["server"], garbage, 1_000_000)
        assert certs.fetch() is None


def test_a_same_size_rewrite_under_the_same_timestamp_is_still_seen(cert_files):
    """ECDSA certificates of one CA are often the same size: a rewrite in place within the clock's
    granularity leaves inode, size and mtime as they were."""
    outcomes: list[str] = []
    certs = ServerCertificates(str(cert_files["server"]), str(cert_files["server-key"]), on_reload=outcomes.append)
    ca = Authority()
    while True:  # a new pair whose files are exactly as long as the old ones
        fresh = ca.server("region-supervisor")
        if (len(fresh.cert_pem), len(fresh.key_pem)) == (cert_files["server"].stat().st_size,
                                                         cert_files["server-key"].stat().st_size):
            break
    for path, data in ((cert_files["server"], fresh.cert_pem), (cert_files["server-key"], fresh.key_pem)):
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert certs.fetch() is not None
    assert outcomes == ["reloaded"]
    assert certs.fetch() is None
