"""The /metrics endpoint over HTTPS with its own certificate (and client CA); plaintext on 127.0.0.1 by default."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from supervisor_service.app.metrics_http import MetricsHTTPServer
from supervisor_service.app.settings import Settings, load_settings
from supervisor_service.app.tls import metrics_ssl_context


def _server(files, *, client_ca: bool = False, timeout_s: float = 5.0):
    settings = {"metrics_tls_cert_file": str(files["server"]), "metrics_tls_key_file": str(files["server-key"])}
    if client_ca:
        settings["metrics_tls_client_ca_file"] = str(files["ca"])
    registry = CollectorRegistry()
    Counter("scraped_thing", "a sample to find", registry=registry).inc()
    drops: list[str] = []
    server = MetricsHTTPServer(registry, "127.0.0.1", 0, timeout_s=timeout_s, on_drop=drops.append,
                               ssl_context=metrics_ssl_context(load_settings(**settings))).start()
    return server, drops


def _get(port: int, files, identity: str | None = None, ca=None) -> bytes:
    context = ssl.create_default_context(cafile=str(ca or files["ca"]))
    if identity:
        context.load_cert_chain(str(files[identity]), str(files[f"{identity}-key"]))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=context) as resp:
        return resp.read()


def test_the_default_is_plaintext_on_the_loopback():
    s = Settings()
    assert s.metrics_addr.startswith("127.0.0.1:")
    assert metrics_ssl_context(s) is None


def test_https_serves_the_metrics_and_plaintext_is_refused(cert_files, other_ca_files):
    server, drops = _server(cert_files)
    try:
        assert b"scraped_thing_total 1.0" in _get(server.server_port, cert_files)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(server.server_port, cert_files, ca=other_ca_files["ca"])
        deadline = time.monotonic() + 5
        while drops.count("tls_failed") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "tls_failed" in drops
        assert b"scraped_thing_total" in _get(server.server_port, cert_files)  # still serving
    finally:
        server.stop()


def test_a_client_ca_requires_a_scraper_certificate(cert_files, other_ca_files):
    server, _ = _server(cert_files, client_ca=True)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _get(server.server_port, cert_files)
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _get(server.server_port, other_ca_files, "admin", ca=cert_files["ca"])
        assert b"scraped_thing_total" in _get(server.server_port, cert_files, "admin")
    finally:
        server.stop()


def test_a_client_that_stalls_in_the_handshake_does_not_hold_the_endpoint(cert_files):
    server, drops = _server(cert_files, timeout_s=0.5)
    stalled = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(20)]
    try:
        stalled[0].send(b"\x16\x03\x01\x00\xff")  # the start of a ClientHello, never finished
        results: list[bytes] = []
        t = threading.Thread(target=lambda: results.append(_get(server.server_port, cert_files)))
        t.start()
        t.join(10)
        assert results and b"scraped_thing_total" in results[0]
        deadline = time.monotonic() + 5
        while drops.count("timeout") < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert drops.count("timeout") >= 20
    finally:
        for s in stalled:
            s.close()
        server.stop()
