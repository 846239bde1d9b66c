"""A stand-in for the metrics the core sets (`core.ports.CoreMetrics`), without prometheus_client.

Each member records what the core did to it: `value` (set or summed), and per label set a child.
"""

from __future__ import annotations

from supervisor_service.core import CoreMetrics


class FakeMetric:
    def __init__(self) -> None:
        self.value = 0.0
        self.children: dict[tuple[tuple[str, str], ...], FakeMetric] = {}

    def set(self, value, /, *more) -> None:
        self.value = (value, *more) if more else value

    def inc(self, amount: float = 1, /) -> None:
        self.value += amount

    def labels(self, **labels: str) -> FakeMetric:
        return self.children.setdefault(tuple(sorted(labels.items())), FakeMetric())

    def child(self, **labels: str) -> float:
        """The value of one child (0 if it was never touched)."""
        found = self.children.get(tuple(sorted(labels.items())))
        return 0.0 if found is None else found.value


def core_metric_names() -> list[str]:
    """The members of CoreMetrics (its properties)."""
    return sorted(name for name, member in vars(CoreMetrics).items() if isinstance(member, property))


class FakeMetrics:
    def __init__(self) -> None:
        for name in core_metric_names():
            setattr(self, name, FakeMetric())

    def __getattr__(self, name: str) -> FakeMetric:  # only for names CoreMetrics does not declare
        raise AttributeError(f"the core used metric {name!r}, which core.ports.CoreMetrics does not declare")
