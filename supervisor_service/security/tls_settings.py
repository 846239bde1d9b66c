"""The TLS settings checked at start: a certificate without its key, a client CA without a server
certificate, a file that does not load, TLS files for etcd without `etcds://`: one ValueError naming
the setting and the file (docs/design.md §14.1). Reads the settings by name: it does not import them."""

from __future__ import annotations

from typing import Any

from supervisor_service.security.tls import ClientTLS, TLSFileError, read_ca, read_pair


def _env(name: str) -> str:
    return f"SUPERVISOR_{name.upper()}"


def _pair(s: Any, cert: str, key: str, ca: str = "") -> None:
    """A certificate and key given together (and a CA only with them); each file loads."""
    cert_file, key_file = getattr(s, cert), getattr(s, key)
    if bool(cert_file) != bool(key_file):
        given, missing = (cert, key) if cert_file else (key, cert)
        raise ValueError(f"{_env(given)} is set ({getattr(s, given)!r}) but {_env(missing)} is not: "
                         "a certificate needs its key")
    if ca and getattr(s, ca) and not cert_file:
        raise ValueError(f"{_env(ca)} is set ({getattr(s, ca)!r}) but {_env(cert)} and {_env(key)} are not: "
                         "client certificates are checked only on a TLS port")
    try:
        if cert_file:
            read_pair(cert_file, key_file)
        if ca and getattr(s, ca):
            read_ca(getattr(s, ca), "client CA file")
    except TLSFileError as exc:
        raise ValueError(f"{_env(cert)}/{_env(key)}{'/' + _env(ca) if ca else ''}: {exc}") from None


def _client(s: Any, prefix: str, *, on: bool, why_off: str) -> None:
    files = {k: getattr(s, f"{prefix}_{k}") for k in ("ca_file", "cert_file", "key_file")}
    if not on:
        given = [k for k, v in files.items() if v]
        if given:
            raise ValueError(f"{_env(prefix + '_' + given[0])} is set but {why_off}")
        return
    if files["cert_file"] and prefix == "remote_tls" and not files["ca_file"]:
        raise ValueError(f"{_env('remote_tls_cert_file')} is set but {_env('remote_tls_ca_file')} is not: "
                         "the remote services' CA turns their TLS on")
    try:
        ClientTLS(**files).check()
    except TLSFileError as exc:
        raise ValueError(f"{_env(prefix + '_*')}: {exc}") from None


def check_tls_settings(s: Any) -> None:
    """ValueError naming the setting and the file for a half-configured or unreadable TLS."""
    _pair(s, "tls_cert_file", "tls_key_file", "tls_client_ca_file")
    _pair(s, "metrics_tls_cert_file", "metrics_tls_key_file", "metrics_tls_client_ca_file")
    # Checked even with every service embedded: the TLS settings may come before the endpoints.
    _client(s, "remote_tls", on=True, why_off="")
    if s.remote_tls_server_name and not s.remote_tls_ca_file:
        raise ValueError(f"{_env('remote_tls_server_name')} is set but {_env('remote_tls_ca_file')} is not")
    _client(s, "etcd_tls", on=s.store.startswith("etcds://"),
            why_off="store is not etcds://host:port[,...] (the etcds:// scheme turns TLS to etcd on)")
