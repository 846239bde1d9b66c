"""The ingest scenarios over gRPC: every fleet stream flat out, small messages from more streams,
churned histories, and a region set that changes every few messages (each a row of the bench).

Each runs against the bench's service with its load generators and measures a window with
`Bench.begin` / `Bench.end`; the streams they add are deregistered afterwards.
"""

from __future__ import annotations

import time

import supervisor_service.bench.loadgen as loadgen

SMALL_ID_BASE = 1 << 20  # datanode ids of the small-message scenario, apart from the fleet's
CHURN_ID_BASE = 2 << 20  # and of the churned-histories scenario


def label(scenario: str, stamped: bool) -> str:
    """A service row's name: the identical-bytes variant is labelled best case (it does not start with
    "ingest", so the targets and notes read the stamped rows)."""
    return scenario if stamped else f"best case, identical bytes: {scenario}"


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def changing(change_every: int) -> str:
    """The name of the changing-region-set scenarios (a row's prefix)."""
    return f"region set changes every {_nth(change_every)} message"


class Floods:
    """The flood scenarios of a running bench (its service, load generators and rows)."""

    def __init__(self, bench) -> None:
        self.b = bench

    def big(self, stamped: bool = True, change_every: int = 0) -> None:
        cfg = self.b.cfg
        self.b.log(f"flood: {cfg.datanodes:,} streams x {cfg.regions:,} regions per message"
                   + ("" if stamped else ", identical bytes") + (f", {changing(change_every)}" if change_every else ""))
        begin = self.b.begin(load_stats=False)
        replies = self.b.gens.all("flood", cfg.flood_s, cfg.window, stamped, change_every)
        self._record(f"{cfg.regions:,} regions/message, every stream flat out", begin, replies, cfg.regions,
                     stamped, change_every)
        time.sleep(0.5)  # let the backlog drain before the next window

    def small(self, stamped: bool = True, change_every: int = 0) -> None:
        cfg = self.b.cfg
        ids = list(range(SMALL_ID_BASE + 1, SMALL_ID_BASE + cfg.small_datanodes + 1))
        self.b.log(f"flood: {cfg.small_datanodes:,} more streams x {cfg.small_regions} regions per message"
                   + ("" if stamped else ", identical bytes") + (f", {changing(change_every)}" if change_every else ""))
        parts = [[d for d in ids if d % cfg.loadgens == i] for i in range(cfg.loadgens)]
        begin = self.b.begin(load_stats=False)
        replies = self.b.gens.call([("extra", "", part, cfg.small_regions, cfg.small_s, cfg.window, stamped, False,
                                   change_every) for part in parts])
        self._record(f"{cfg.small_regions} regions/message, {cfg.small_datanodes:,} more streams flat out", begin,
                     replies, cfg.small_regions, stamped, change_every)
        self._deregister(ids, cfg.small_regions)

    def _record(self, what: str, begin: dict, replies: list[dict], regions: int, stamped: bool,
                change_every: int) -> None:
        """The row of one flood window, keyed for pairing with the no-op server's row of the same stream."""
        name = f"{changing(change_every)}: {what}" if change_every else label(f"ingest: {what}", stamped)
        row = self.b.end(name, begin, load_cpu=sum(r["cpu"] for r in replies))
        row.errors = sum(r["errors"] for r in replies)
        row.extra.update(client=replies, pair=(regions, stamped, change_every) if change_every else
                         (regions, stamped))
        self.b.rows.append(row)

    def churned(self) -> None:
        """Churned histories: each region index of a stream joins one heartbeat after the previous one
        (the stream ramps its region set 1, 2, ... n flat out), then every stream floods the whole set."""
        cfg = self.b.cfg
        n, regions = cfg.churn_datanodes, cfg.churn_regions
        ids = list(range(CHURN_ID_BASE + 1, CHURN_ID_BASE + n + 1))
        self.b.log(f"churned histories: {n:,} streams ramp to {regions:,} regions one heartbeat apart, then flood")
        parts = [[d for d in ids if d % cfg.loadgens == i] for i in range(cfg.loadgens)]
        started = time.monotonic()
        # The window begins once every stream is through its ramp: the load generators wait for
        # that before measuring; here the service side starts its own window at the same moment,
        # approximated by the slowest generator's ramp (each replies with how long it took).
        commands = [("extra", "", part, regions, cfg.churn_s, cfg.window, True, True) for part in parts]
        for (_, conn), command in zip(self.b.gens.procs, commands):
            conn.send(command)
        # The ramp's end shows in the table: every stream's last region registered.
        want = self.b.host.detectors() + n * regions
        deadline = time.monotonic() + 900
        while self.b.host.detectors() < want and time.monotonic() < deadline:
            time.sleep(0.05)
        ramp_s = time.monotonic() - started
        time.sleep(0.2)  # the generators notice the ramp's end within 50 ms
        begin = self.b.begin(load_stats=False)
        replies = []
        for (_, conn), command in zip(self.b.gens.procs, commands):
            if not conn.poll(900 + cfg.churn_s):
                raise RuntimeError("load generator did not finish the churned flood")
            reply = conn.recv()
            if "error" in reply:
                raise RuntimeError(f"load generator failed on the churned flood: {reply['error']}")
            replies.append(reply)
        row = self.b.end(f"churned histories: {n:,} x {regions:,} regions, each region index joined one heartbeat "
                        "apart, flat out", begin, load_cpu=sum(r["cpu"] for r in replies))
        row.errors = sum(r["errors"] for r in replies)
        row.result = f"ramp (the joins) took {ramp_s:.1f} s"
        row.extra.update(client=replies, ramp_s=ramp_s)
        self.b.rows.append(row)
        self._deregister(ids, regions)

    def _deregister(self, ids: list[int], regions: int) -> None:
        from supervisor_service.client import SupervisorClient

        pairs = [(d, r) for d in ids for r in loadgen.region_ids_of(d, regions)]
        with SupervisorClient(self.b.host.service.addresses.grpc, timeout=60) as client:
            removed = client.deregister(pairs)
        self.b.log(f"deregistered {removed:,} detectors of the extra streams")
