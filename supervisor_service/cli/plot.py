"""`history --plot FILE.png`: one failover on one time axis (matplotlib, the optional `plot` extra).

phi of the failed regions from their last heartbeat, recomputed from the record's evidence (mean
and std as observed, the acceptable pause added, the std floored at the default
min_std_deviation_ms), rising to the threshold; the conviction (where it crosses), the decision
(the submission), and the end of the migration when it ended.
"""

from __future__ import annotations

MIN_STD_MS = 100.0  # the default min_std_deviation_ms (the record does not carry it)


def plot_record(rec, path: str) -> None:  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("supervisor-service: error: --plot needs matplotlib: pip install 'region-supervisor[plot]'")
    from supervisor_service.core import phi_from

    e = max(rec.evidence, key=lambda x: x.phi) if rec.evidence else None
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    t0 = e.last_heartbeat_millis if e else rec.decided_at_millis
    end = max(rec.decided_at_millis, rec.finished_at_millis) + 2000
    if e is not None:
        mean = e.mean_interval_millis + rec.acceptable_heartbeat_pause_millis
        std = max(e.std_deviation_millis, MIN_STD_MS)
        xs = list(range(t0, end, max((end - t0) // 400, 1)))
        ys = [min(phi_from(x - t0, mean, std), rec.threshold * 3) for x in xs]
        ax.plot([(x - t0) / 1000 for x in xs], ys, label=f"phi of region {e.region_id >> 32}/{e.region_id & 0xFFFFFFFF}")
        crossed = next((x for x, y in zip(xs, ys) if y >= rec.threshold), None)
        if crossed is not None:
            ax.axvline((crossed - t0) / 1000, color="tab:orange", linestyle=":", label="phi reaches the threshold")
    ax.axhline(rec.threshold, color="tab:red", linestyle="--", label=f"threshold {rec.threshold:g}")
    ax.axvline((rec.decided_at_millis - t0) / 1000, color="tab:green", label="decided and submitted")
    if rec.finished_at_millis:
        ax.axvline((rec.finished_at_millis - t0) / 1000, color="tab:purple", linestyle="-.", label="migration ended")
    ax.set_xlabel(f"seconds since the last heartbeat of datanode {rec.from_peer.id}")
    ax.set_ylabel("phi")
    n = len(rec.region_ids)
    ax.set_title(f"failover of datanode {rec.from_peer.id} to {rec.to_peer.id} ({n} region{'' if n == 1 else 's'})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
