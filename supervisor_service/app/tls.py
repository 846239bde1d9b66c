"""TLS as the settings ask for it (checked at start by `security/tls_settings.py`): the server's
certificates, the remotes' and etcd's client TLS, and the /metrics endpoint's SSL context
(docs/design.md §14.1)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from supervisor_service.security.tls import ClientTLS, ServerCertificates

if TYPE_CHECKING:
    from supervisor_service.app.settings import Settings


def server_certificates(s: Settings, on_reload: Callable[[str], None]) -> ServerCertificates | None:
    """The gRPC port's certificates (None: plaintext)."""
    if not s.tls_cert_file:
        return None
    return ServerCertificates(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file, on_reload=on_reload)


def remote_tls(s: Settings) -> ClientTLS | None:
    if not s.remote_tls_ca_file:
        return None
    return ClientTLS(s.remote_tls_ca_file, s.remote_tls_cert_file, s.remote_tls_key_file, s.remote_tls_server_name)


def etcd_tls(s: Settings) -> ClientTLS | None:
    if not s.store.startswith("etcds://"):
        return None
    return ClientTLS(s.etcd_tls_ca_file, s.etcd_tls_cert_file, s.etcd_tls_key_file)


def metrics_ssl_context(s: Settings) -> ssl.SSLContext | None:
    """The /metrics endpoint's server context (None: plaintext)."""
    if not s.metrics_tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(s.metrics_tls_cert_file, s.metrics_tls_key_file)
    if s.metrics_tls_client_ca_file:
        context.load_verify_locations(s.metrics_tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
