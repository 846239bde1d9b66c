"""A half-configured or unreadable TLS is a settings error at start, naming the setting and the file."""

from __future__ import annotations

import pytest

from supervisor_service.app.settings import ConfigError, load_settings


def _load(**kw):
    return load_settings(**{k: str(v) for k, v in kw.items()})


def test_server_tls_loads(cert_files):
    s = _load(tls_cert_file=cert_files["server"], tls_key_file=cert_files["server-key"],
              tls_client_ca_file=cert_files["ca"])
    assert s.tls_client_ca_file == str(cert_files["ca"])


@pytest.mark.parametrize(("given", "message"), [
    ({"tls_cert_file": "server"}, "SUPERVISOR_TLS_CERT_FILE is set .* but SUPERVISOR_TLS_KEY_FILE is not"),
    ({"tls_key_file": "server-key"}, "SUPERVISOR_TLS_KEY_FILE is set .* but SUPERVISOR_TLS_CERT_FILE is not"),
    ({"tls_client_ca_file": "ca"}, "SUPERVISOR_TLS_CLIENT_CA_FILE is set .* only on a TLS port"),
    ({"tls_cert_file": "server", "tls_key_file": "admin-key"}, "does not match"),
    ({"tls_cert_file": "server", "tls_key_file": "server-key", "tls_client_ca_file": "ca-key"},
     "client CA file .* holds no PEM certificate"),
    ({"metrics_tls_cert_file": "server"}, "SUPERVISOR_METRICS_TLS_KEY_FILE is not"),
    ({"remote_tls_cert_file": "metasrv", "remote_tls_key_file": "metasrv-key"}, "SUPERVISOR_REMOTE_TLS_CA_FILE is not"),
    ({"remote_tls_ca_file": "ca", "remote_tls_cert_file": "metasrv"}, "without its key"),
    ({"remote_tls_server_name": "x"}, "SUPERVISOR_REMOTE_TLS_CA_FILE is not"),
    ({"etcd_tls_ca_file": "ca"}, "SUPERVISOR_ETCD_TLS_CA_FILE is set but store is not etcds://"),
])
def test_half_configured_tls_is_refused_naming_the_setting(cert_files, given, message):
    with pytest.raises(ConfigError, match=message):
        _load(**{k: cert_files[v] if v in cert_files else v for k, v in given.items()})


def test_a_missing_file_is_named(tmp_path, cert_files):
    missing = tmp_path / "gone.pem"
    with pytest.raises(ConfigError, match=f"SUPERVISOR_TLS_CERT_FILE.*{missing}.*cannot be read"):
        _load(tls_cert_file=missing, tls_key_file=cert_files["server-key"])


def test_etcds_takes_the_etcd_tls_settings(cert_files):
    s = _load(store="etcds://127.0.0.1:2379", etcd_tls_ca_file=cert_files["ca"],
              etcd_tls_cert_file=cert_files["metasrv"], etcd_tls_key_file=cert_files["metasrv-key"])
    assert s.store.startswith("etcds://")
    with pytest.raises(ConfigError, match="SUPERVISOR_ETCD_TLS_"):
        _load(store="etcds://127.0.0.1:2379", etcd_tls_cert_file=cert_files["metasrv"])
