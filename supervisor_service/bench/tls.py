"""What TLS costs a heartbeat: the same floods against a fresh service, plaintext, then mTLS.

Each service is started alone (the bench's own service is stopped by then), with an empty table;
the load generators open new streams (ids apart from the fleet's), plaintext to the first and
TLS with a client certificate to the second (certificates made for the run), and flood them for
`ceiling_s` at each message size. The rows say messages/s and the service's CPU per message;
the TLS row's result says how much more CPU per message than plaintext, and how many fewer
messages per second.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from supervisor_service.bench.floods import SMALL_ID_BASE
from supervisor_service.bench.rows import Row
from supervisor_service.security.certs import write_bundle
from supervisor_service.security.tls import ClientTLS


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
        plain: dict[int, Row] = {}
        for on in (False, True):
            bench.log(f"TLS {'on (mTLS)' if on else 'off'}: a fresh service")
            bench.host = service_host(**(server if on else {}))
            addr = bench.host.start()
            try:
                for streams, regions in sizes:
                    ids = list(range(SMALL_ID_BASE + 1, SMALL_ID_BASE + streams + 1))
                    parts = [[d for d in ids if d % cfg.loadgens == i] for i in range(cfg.loadgens)]
                    bench.log(f"TLS {'on' if on else 'off'}: {streams:,} streams x {regions:,} regions per message")
                    begin = bench.begin(load_stats=False)
                    replies = bench.gens.call([("extra", addr, part, regions, cfg.ceiling_s, cfg.window, True, False,
                                                0, client if on else None) for part in parts])
                    row = bench.end(f"TLS {'on (mTLS)' if on else 'off'}: {regions:,} regions/message, "
                                    f"{streams:,} new streams flat out", begin,
                                    load_cpu=sum(r["cpu"] for r in replies))
                    row.errors = sum(r["errors"] for r in replies)
                    row.extra.update(client=replies, tls=on)
                    if not on:
                        plain[regions] = row
                        row.result = "plaintext"
                    else:
                        row.result = _cost(plain.get(regions), row)
                    rows.append(row)
            finally:
                bench.host.stop()
                bench.host = None
    return rows


def _cost(plain: Row | None, tls: Row) -> str:
    """How TLS compares with plaintext at the same size: CPU per message and messages/s."""
    if plain is None or not plain.cpu_us_msg or not tls.cpu_us_msg or not plain.msgs_s or not tls.msgs_s:
        return "no plaintext row to compare with"
    cpu = tls.cpu_us_msg / plain.cpu_us_msg - 1
    rate = tls.msgs_s / plain.msgs_s - 1
    return f"CPU/message {cpu:+.0%}, messages/s {rate:+.0%} vs plaintext"
