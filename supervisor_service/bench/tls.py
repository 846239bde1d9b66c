"""What TLS costs a heartbeat: the same floods against two fresh services, one plaintext, one mTLS.

Both services run side by side in this process, each with an empty table and an acceptable pause
of ten minutes (a stream that stops after its flood is not failed over while the other is
measured). The load generators open new streams (ids apart from the fleet's), plaintext to one and
TLS with a client certificate to the other (certificates made for the run), flood each once to
register their detectors, then measure `ROUNDS` windows of `ceiling_s` per service, alternating
which goes first: on a shared machine, other work drifts over a run, and alternating windows see
the same drift. Each flood opens new connections (a handshake per connection, not per stream).
A row is the window with the median CPU per message; the TLS row's result compares it with the
plaintext row's. The process CPU is both services' (the idle one's ticks are in both rows alike).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from supervisor_service.bench.floods import SMALL_ID_BASE
from supervisor_service.bench.rows import Row
from supervisor_service.security.certs import write_bundle
from supervisor_service.security.tls import ClientTLS

ROUNDS = 3
_QUIET = {"acceptable_heartbeat_pause_ms": 600_000}


def measure(bench, sizes, service_host) -> list[Row]:
    """A TLS-off and a TLS-on row for each (streams, regions) of `sizes`; `service_host(**settings)` is the
    runner's `ServiceHost`."""
    cfg = bench.cfg
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        files = write_bundle(Path(tmp), datanodes=0)
        client = ClientTLS(str(files["ca"]), str(files["admin"]), str(files["admin-key"]))
        server = {"tls_cert_file": str(files["server"]), "tls_key_file": str(files["server-key"]),
                  "tls_client_ca_file": str(files["ca"])}
        bench.log("TLS off and on: two fresh services")
        hosts = {False: service_host(**_QUIET), True: service_host(**_QUIET, **server)}
        addrs = {on: host.start() for on, host in hosts.items()}
        try:
            for streams, regions in sizes:
                ids = list(range(SMALL_ID_BASE + 1, SMALL_ID_BASE + streams + 1))
                parts = [[d for d in ids if d % cfg.loadgens == i] for i in range(cfg.loadgens)]

                def flood(on: bool, seconds: float) -> list[dict]:
                    return bench.gens.call([("extra", addrs[on], part, regions, seconds, cfg.window, True, False, 0,
                                             client if on else None) for part in parts])

                bench.log(f"TLS off and on: {streams:,} streams x {regions:,} regions per message, "
                          f"{ROUNDS} rounds each")
                for on in (False, True):
                    flood(on, min(2.0, cfg.ceiling_s))  # registers the detectors, unmeasured
                windows: dict[bool, list[Row]] = {False: [], True: []}
                for r in range(ROUNDS):
                    for on in ((False, True) if r % 2 == 0 else (True, False)):
                        bench.host = hosts[on]
                        begin = bench.begin(load_stats=False)
                        replies = flood(on, cfg.ceiling_s)
                        row = bench.end(f"TLS {'on (mTLS)' if on else 'off'}: {regions:,} regions/message, "
                                        f"{streams:,} new streams flat out", begin,
                                        load_cpu=sum(reply["cpu"] for reply in replies))
                        row.errors = sum(reply["errors"] for reply in replies)
                        row.extra.update(client=replies, tls=on)
                        windows[on].append(row)
                plain, tls = (_median(windows[on]) for on in (False, True))
                plain.result = "plaintext"
                tls.result = _cost(plain, tls)
                rows += [plain, tls]
        finally:
            bench.host = None
            for host in hosts.values():
                host.stop()
    return rows


def _median(windows: list[Row]) -> Row:
    """The window of median CPU per message, with every window's numbers in `extra["rounds"]`."""
    ordered = sorted(windows, key=lambda row: row.cpu_us_msg or 0.0)
    row = ordered[len(ordered) // 2]
    row.errors = sum(w.errors or 0 for w in windows)
    row.extra["rounds"] = [{"msgs_s": w.msgs_s, "cpu_us_msg": w.cpu_us_msg} for w in windows]
    row.extra["msgs_s_median"] = statistics.median(w.msgs_s or 0.0 for w in windows)
    return row


def _cost(plain: Row, tls: Row) -> str:
    """How TLS compares with plaintext at the same size: CPU per message and messages/s (medians)."""
    if not plain.cpu_us_msg or not tls.cpu_us_msg or not plain.extra["msgs_s_median"]:
        return "no plaintext window to compare with"
    cpu = tls.cpu_us_msg / plain.cpu_us_msg - 1
    rate = tls.extra["msgs_s_median"] / plain.extra["msgs_s_median"] - 1
    return f"CPU/message {cpu:+.0%}, messages/s {rate:+.0%} vs plaintext (medians of {ROUNDS})"
