"""A real Prometheus server scrapes the service: the exposition parses and the names are queryable."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from supervisor_service.client import SupervisorClient
from tests.support.servers import free_port, require_binary, stop_process

pytestmark = pytest.mark.realtime


def _query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_metric_family(service, tmp_path):
    running_service = service(metrics_addr="127.0.0.1:0", tick_interval_ms=200)
    binary = require_binary("prometheus", "prometheus")
    with SupervisorClient(running_service.addresses.grpc) as client:
        assert client.register([(1, 10), (1, 11), (2, 20)]) == 3
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: supervisor\n"
        f"    static_configs:\n      - targets: ['{running_service.addresses.metrics}']\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, "prometheus exited"
            try:
                result = _query(base, 'supervisor_detectors{job="supervisor"}')
            except OSError:
                result = []
            if result and float(result[0]["value"][1]) == 3:
                break
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) == 3, result
        assert float(_query(base, 'up{job="supervisor"}')[0]["value"][1]) == 1
        # The tick-refreshed phi histogram and the regular one are both scraped as histograms.
        assert _query(base, 'supervisor_detector_phi_count{job="supervisor"}')
        assert _query(base, 'supervisor_tick_duration_seconds_bucket{job="supervisor",le="+Inf"}')
        assert _query(base, 'supervisor_thread_alive{job="supervisor"}')[0]["value"][1] == "1"
    finally:
        stop_process(proc)
