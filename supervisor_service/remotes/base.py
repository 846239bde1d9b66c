"""What the supervisor needs of its remote services, their errors, and the directory of peers heard from."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from supervisor_service.core import Clock, MigrationResult, MigrationState, MigrationTask, Peer


class RemoteError(Exception):
    """A remote call failed; `code` is the gRPC status code name (or a local reason)."""

    def __init__(self, service: str, method: str, code: str, detail: str) -> None:
        super().__init__(f"{service}.{method} failed: {code}: {detail}")
        self.service, self.method, self.code, self.detail = service, method, code, detail


class StaleLeaderTerm(RemoteError):
    """RegionMigration refused the call: a newer leader term has been seen."""


class PeerLookup(Protocol):
    def get_datanode(self, datanode_id: int) -> Peer | None: ...


class Selector(Protocol):
    def select(
        self, min_required_items: int, exclude_peer_ids: set[int], from_peer_id: int, region_ids: tuple[int, ...]
    ) -> list[Peer]: ...


class RegionMigration(Protocol):
    def submit(self, task: MigrationTask) -> MigrationResult: ...

    def status(self, procedure_id: str) -> tuple[MigrationState, str]: ...


@dataclass(slots=True)
class _Seen:
    addr: str
    last_seen_ms: int
    epoch: int
    epoch_heard_ms: int  # when a heartbeat of `epoch` was last accepted


class PeerDirectory:
    """What the heartbeats say about each datanode: address, last time heard, epoch.

    Written by the gRPC edge on every heartbeat message, read by the embedded
    PeerLookup and Selector; a lock guards it because both sides are threads.
    The two calls of every message take it only when something changes: a
    heartbeat that repeats the known address and epoch stores its times (each
    a single attribute, written whole under the GIL), and an epoch not below
    the newest needs no consistent pair of fields to be let through.

    Epochs fence a datanode's earlier life: a heartbeat with an epoch below the
    newest seen is stale, unless the newest has been silent for longer than
    `new_life_after_ms`. Then the lower epoch is a new life (a datanode whose
    restart counter went back), so that no single epoch, not even 2**64-1, can
    fence a datanode for good.
    """

    def __init__(self, clock: Clock, new_life_after_ms: float = 10_000) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[int, _Seen] = {}
        self.new_life_after_ms = new_life_after_ms

    def observe(self, datanode_id: int, addr: str, epoch: int = 0) -> None:
        """An accepted heartbeat (`addr` empty: keep the address known; `epoch` 0: unknown)."""
        now = self._clock.now_ms()
        seen = self._seen.get(datanode_id)
        if seen is not None and (not addr or addr == seen.addr) and (not epoch or epoch == seen.epoch):
            seen.last_seen_ms = now  # nothing else changes: no lock (see the class docstring)
            if epoch:
                seen.epoch_heard_ms = now
            return
        with self._lock:
            seen = self._seen.get(datanode_id)
            if seen is None:
                self._seen[datanode_id] = _Seen(addr, now, epoch, now)
                return
            seen.last_seen_ms = now
            if addr:
                seen.addr = addr
            if epoch and (epoch >= seen.epoch or now - seen.epoch_heard_ms > self.new_life_after_ms):
                seen.epoch, seen.epoch_heard_ms = epoch, now

    def epoch(self, datanode_id: int) -> int:
        with self._lock:
            seen = self._seen.get(datanode_id)
            return 0 if seen is None else seen.epoch

    def epoch_silence(self, datanode_id: int, epoch: int) -> int | None:
        """None when `epoch` is not below the newest seen (or unknown); otherwise for how long, in ms,
        the newest has been silent (the heartbeat is stale while that is at most `new_life_after_ms`)."""
        if epoch == 0:
            return None
        seen = self._seen.get(datanode_id)
        if seen is None or epoch >= seen.epoch:  # the common answer needs one field: read unlocked
            return None
        with self._lock:
            seen = self._seen.get(datanode_id)
            if seen is None or epoch >= seen.epoch:
                return None
            return self._clock.now_ms() - seen.epoch_heard_ms

    def peer(self, datanode_id: int) -> Peer | None:
        with self._lock:
            seen = self._seen.get(datanode_id)
            return None if seen is None else Peer(datanode_id, seen.addr)

    def alive(self, window_ms: int) -> list[Peer]:
        """Datanodes heard from within `window_ms`, by id."""
        now = self._clock.now_ms()
        with self._lock:
            return [
                Peer(d, s.addr)
                for d, s in sorted(self._seen.items())
                if now - s.last_seen_ms <= window_ms
            ]
