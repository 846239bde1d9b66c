"""Who leads. One replica (SQLite or memory store) always does; several elect one through etcd.

Both implementations answer `is_leader()`, `leader_addr()` and `term` from
any thread; `EtcdElection` is in `cluster/etcd.py`, and `open_cluster`
(`cluster/open.py`) picks one of them with the store they go with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol


class Leadership(Protocol):
    advertise_addr: str
    """This replica's address as clients should reach it (set once the port is bound)."""

    def is_leader(self) -> bool: ...

    def holds(self, term: int) -> bool:
        """True while writes made under `term` may still be committed (the store drops the others)."""

    def leader_addr(self) -> str:
        """This replica's address while it leads, the leader's when known, else '' (never this replica's own
        address when it does not lead)."""

    @property
    def term(self) -> int: ...

    def start(self) -> None: ...

    def resign(self) -> None: ...

    def step_down(self, reason: str) -> None:
        """Stop acting as leader now (a fenced write or a refused term said another leader exists)."""


class SingleLeadership:
    """The only replica: leader from `start` until it resigns or is fenced out.

    The term is the stored term plus one, persisted by the caller before
    anything is submitted under it, so a restarted replica always submits
    with a higher term than its previous life.
    """

    def __init__(
        self,
        advertise_addr: str,
        *,
        next_term: Callable[[], int],
        on_elected: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.advertise_addr = advertise_addr  # set again by the service once its port is bound
        self._next_term = next_term
        self._on_elected = on_elected
        self._on_lost = on_lost
        self._leader = threading.Event()
        self._term = 0
        self._fenced = False

    def is_leader(self) -> bool:
        return self._leader.is_set()

    def holds(self, term: int) -> bool:
        # After `resign` (shutdown) the term still holds: no other process can use this data
        # directory while this one holds its lock, so what was handled is still committed.
        return term == self._term and term > 0 and not self._fenced

    def leader_addr(self) -> str:
        return self.advertise_addr if self._leader.is_set() else ""

    @property
    def term(self) -> int:
        return self._term

    def start(self) -> None:
        self._term = self._next_term()
        self._leader.set()
        self._on_elected(self._term)

    def resign(self) -> None:
        if self._leader.is_set():
            self._leader.clear()
            self._on_lost()

    def step_down(self, reason: str) -> None:
        self._fenced = True
        if self._leader.is_set():
            self._leader.clear()
            self._on_lost()
