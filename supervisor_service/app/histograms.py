"""What the service's own histogram collectors share: counts per bucket as Prometheus exports them."""

from __future__ import annotations

from collections.abc import Iterable


def cumulative_buckets(bounds: Iterable[float], counts: Iterable[int]) -> list[tuple[str, int]]:
    """(`le`, observations at or under it) for each upper bound, from the counts of each bucket alone."""
    cumulative, running = [], 0
    for bound, n in zip(bounds, counts):
        running += n
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return cumulative
