"""Guards against false and runaway failovers (docs/design.md §5).

The original supervisor fails over whatever crosses the phi threshold. These
guards, each borrowed from a system that learnt it the hard way, sit between
"phi says failed" and "submit a migration". Each has a setting (0 or an
off value disables it), a metric and a log line. Like `Supervisor`, this
module reads no clock and does no I/O: every method takes `now` (ms).

- local pause (Cassandra's max_local_pause): a stall of the supervisor itself
  (GC, SIGSTOP, an overloaded queue) holds convictions until every datanode
  has had a fair chance to be heard again;
- mass failure (Kubernetes' unhealthy-zone threshold): when too many
  datanodes are silent at once, the supervisor is more likely the one cut
  off; failover is held until the fraction drops or an operator releases it;
- rate limits (Kubernetes' eviction rate, PD's store limit): token buckets
  on failovers, global (datanodes) and per target datanode (regions); the
  oldest failure is served first;
- flap damping (CockroachDB's suspect time): a datanode that just failed or
  keeps coming and going is not a target for a while, and its own regions
  back off exponentially before another failover.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from supervisor_service.core.options import GuardSettings


class TokenBucket:
    """`rate` tokens per second up to `burst`; starts full."""

    def __init__(self, rate_per_s: float, burst: float, now: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: int) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate / 1000.0)
            self.stamp = now

    def available(self, now: int) -> int:
        self._refill(now)
        return math.floor(self.tokens + 1e-9)

    def ready_at(self, n: int, now: int) -> int:
        """The earliest time at or after `now` (and the last take) when `n` tokens are there."""
        now = max(now, self.stamp)
        self._refill(now)
        missing = n - self.tokens - 1e-9
        if missing <= 0:
            return now
        return now + math.ceil(missing * 1000.0 / self.rate) if self.rate > 0 else 2**62

    def take(self, n: int, now: int) -> bool:
        self._refill(now)
        if self.tokens + 1e-9 >= n:
            self.tokens -= n
            return True
        return False


@dataclass(slots=True)
class _Datanode:
    failed_since: int | None = None  # first crossing of the current failure
    recoveries: deque[int] = field(default_factory=deque)  # times it came back
    failovers: deque[int] = field(default_factory=deque)  # times its regions were submitted


class Guards:
    """Guard state, owned (like the table) by the supervisor thread."""

    def __init__(self, settings: GuardSettings) -> None:
        self.s = settings
        # Budgets outlive a leadership in this process: a replica whose leadership flaps must not
        # get a fresh burst each time it leads again. (Another replica starts with full buckets.)
        self._global: TokenBucket | None = None
        self._targets: dict[int, TokenBucket] = {}
        self._holddown: dict[int, int] = {}  # target datanode -> excluded until
        # Heartbeats refused by this process's queue: kept across a leadership change (they were not
        # heard by this replica, whichever leadership it is in).
        self._overload_hold_until = 0
        self.heartbeats_refused = 0  # as the last tick that saw any learnt of them
        self.reset()

    def reset(self) -> None:
        """Forget the observations (on becoming or ceasing to be leader). A leadership's guards
        start from what it sees itself, whichever replica wins: the recovery's fresh heartbeat at now
        is not a recovery, a decision lost with the previous leadership is not an earlier failover to
        back off from, and the time without leading is not a stall of this process. The rate budgets
        and the target hold-downs are kept."""
        self._last_tick: int | None = None
        self._pause_hold_until = 0
        self.released_mass_failure = False
        self.mass_failure_fraction = 0.0
        self._silent = 0  # datanodes unheard for mass_failure_silence_ms, as of the last tick
        self._now = 0  # the last tick's time
        self._mass_recovery_until = 0  # a cleared mass failure is still held until then
        self._nodes: dict[int, _Datanode] = {}

    # ------------------------------------------------------------ per tick

    def observe_tick(self, now: int, lag_ms: float, queue_fill: float, heartbeats_refused: int = 0) -> str | None:
        """Local pause and overload: a reason to hold this tick's convictions, or None.

        Call on every tick, failures or not, so the gap between ticks is measured.
        `heartbeats_refused`: heartbeats that found no room in the event queue since the last tick;
        any holds convictions (`overload`) for `overload_hold_ms` from this tick, whatever the
        queue's fill now (a burst refused and drained before this tick lost evidence all the same).
        """
        s = self.s
        reason = None
        if s.max_local_pause_ms > 0:
            gap = 0 if self._last_tick is None else now - self._last_tick - s.tick_interval_ms
            stall = max(gap, lag_ms)
            if stall > s.max_local_pause_ms:
                self._pause_hold_until = now + s.local_pause_hold_ms
                reason = "local_pause"
            elif now < self._pause_hold_until:
                reason = "local_pause"
        self._last_tick = now
        if heartbeats_refused > 0 and s.overload_hold_ms > 0:
            self._overload_hold_until = now + s.overload_hold_ms
            self.heartbeats_refused = heartbeats_refused
        if reason is None and (
            (s.overload_queue_fraction < 1 and queue_fill > s.overload_queue_fraction)
            or now < self._overload_hold_until
        ):
            reason = "overload"
        return reason

    def overload_held(self, now: int) -> bool:
        """Whether refused heartbeats still hold convictions (as the last `observe_tick` found it)."""
        return now < self._overload_hold_until

    def overload_details(self, now: int) -> dict[str, object]:
        """What the held log line of `overload` says: until when refused heartbeats hold convictions."""
        if now >= self._overload_hold_until:
            return {"cause": "queue_fill"}
        return {"cause": "heartbeats_refused", "heartbeats_refused": self.heartbeats_refused,
                "until_ms": self._overload_hold_until}

    def local_pause_held(self, now: int) -> bool:
        """Whether convictions are still held after a stall (as the last `observe_tick` found it)."""
        return now < self._pause_hold_until

    def track(self, failed: set[int], silent: int, datanodes: int, now: int) -> None:
        """Record failure and recovery transitions, and the fraction of silent datanodes."""
        for d in failed:
            node = self._nodes.setdefault(d, _Datanode())
            if node.failed_since is None:
                node.failed_since = now
        for d, node in self._nodes.items():
            if node.failed_since is not None and d not in failed:
                node.failed_since = None
                node.recoveries.append(now)
        self._expire(now)
        self._silent = silent
        self.mass_failure_fraction = silent / datanodes if datanodes else 0.0
        self._now = now
        if self._mass_tripped():
            self._mass_recovery_until = now + self.s.mass_failure_recovery_ms

    def _mass_tripped(self) -> bool:
        s = self.s
        return (
            s.max_failed_datanode_fraction < 1
            and self._silent >= s.mass_failure_min_datanodes
            and self.mass_failure_fraction > s.max_failed_datanode_fraction
        )

    def mass_failure(self) -> bool:
        """True while failover is held for a mass failure, or for `mass_failure_recovery_ms` after
        it cleared, unless an operator released it (a release lasts until the condition clears)."""
        if self._mass_tripped():
            return not self.released_mass_failure
        if self.released_mass_failure:
            self.released_mass_failure = False
            self._mass_recovery_until = 0  # the operator let it fail over: no recovery hold either
            return False
        return self._now < self._mass_recovery_until

    def release(self) -> bool:
        """An operator lets the current mass failure fail over. True if a hold was active."""
        was = self.mass_failure()
        self.released_mass_failure = True
        return was

    def _expire(self, now: int) -> None:
        horizon = now - self.s.flap_window_ms
        for d in list(self._nodes):
            node = self._nodes[d]
            while node.recoveries and node.recoveries[0] < horizon:
                node.recoveries.popleft()
            while node.failovers and node.failovers[0] < horizon:
                node.failovers.popleft()
            if node.failed_since is None and not node.recoveries and not node.failovers:
                del self._nodes[d]
        for d in [d for d, until in self._holddown.items() if until <= now]:
            del self._holddown[d]

    # ------------------------------------------------------------ ordering and budgets

    def failed_since(self, datanode_id: int, now: int) -> int:
        node = self._nodes.get(datanode_id)
        return now if node is None or node.failed_since is None else node.failed_since

    def backoff_until(self, datanode_id: int) -> int:
        """Earliest time the datanode's regions may be failed over again (flap damping)."""
        s = self.s
        node = self._nodes.get(datanode_id)
        if s.flap_backoff_base_ms <= 0 or node is None or node.failed_since is None:
            return 0
        # Failovers of earlier failure episodes within the window; retries of this one do not count.
        n = sum(1 for t in node.failovers if t < node.failed_since)
        if n == 0:
            return 0
        delay = min(s.flap_backoff_max_ms, s.flap_backoff_base_ms * (1 << (n - 1)))
        return node.failed_since + delay

    def take_global(self, now: int) -> bool:
        s = self.s
        if s.failover_rate_per_s <= 0:
            return True
        if self._global is None:
            self._global = TokenBucket(s.failover_rate_per_s, s.failover_burst, now)
        return self._global.take(1, now)

    def take_target(self, target_id: int, wanted: int, now: int) -> int:
        """How many of `wanted` regions may go to `target_id` now (the tokens are taken)."""
        s = self.s
        if s.target_regions_per_s <= 0:
            return wanted
        bucket = self._targets.get(target_id)
        if bucket is None:
            bucket = self._targets[target_id] = TokenBucket(s.target_regions_per_s, s.target_burst_regions, now)
        granted = min(wanted, bucket.available(now))
        bucket.take(granted, now)
        return granted

    def excluded_targets(self, now: int) -> set[int]:
        """Datanodes not to choose as targets: recently failed, or flapping."""
        if self.s.target_holddown_ms <= 0:
            return set()
        out = {d for d, until in self._holddown.items() if until > now}
        out.update(d for d, node in self._nodes.items() if node.failed_since is not None)
        return out | self.flapping()

    def note_failover(self, datanode_id: int, now: int) -> None:
        """Regions of `datanode_id` were submitted: count it for backoff, hold it down as a target."""
        self._nodes.setdefault(datanode_id, _Datanode()).failovers.append(now)
        if self.s.target_holddown_ms > 0:
            self._holddown[datanode_id] = now + self.s.target_holddown_ms

    # ------------------------------------------------------------ readings (Explain, WhatIf: no change)

    @property
    def silent_datanodes(self) -> int:
        """Datanodes unheard for mass_failure_silence_ms at the last tick."""
        return self._silent

    def next_tick(self, t: int) -> int:
        """The first tick still to come at or after `t`, were ticks to keep their interval from the last one
        (`t` when no tick was seen)."""
        last, every = self._last_tick, self.s.tick_interval_ms
        if last is None or every <= 0:
            return t
        if t <= last:  # that tick has run: the next one
            return last + every
        return last + -(-(t - last) // every) * every

    @property
    def pause_hold_until(self) -> int:
        return self._pause_hold_until

    @property
    def overload_hold_until(self) -> int:
        return self._overload_hold_until

    def global_budget(self, now: int) -> TokenBucket | None:
        """A copy of the global budget as of `now` (None: unlimited); taking from it changes nothing here."""
        s = self.s
        if s.failover_rate_per_s <= 0:
            return None
        bucket = TokenBucket(s.failover_rate_per_s, s.failover_burst, now)
        if self._global is not None:
            bucket.tokens, bucket.stamp = self._global.tokens, min(self._global.stamp, now)
        return bucket

    def flap_delay(self, datanode_id: int) -> int:
        """The backoff a new failure of `datanode_id` would start with (0: none; see `backoff_until`)."""
        s = self.s
        node = self._nodes.get(datanode_id)
        if s.flap_backoff_base_ms <= 0 or node is None:
            return 0
        n = len(node.failovers) if node.failed_since is None else sum(1 for t in node.failovers if t < node.failed_since)
        return min(s.flap_backoff_max_ms, s.flap_backoff_base_ms * (1 << (n - 1))) if n else 0

    def flapping(self) -> set[int]:
        """Datanodes that came back `flap_threshold` times or more within the window."""
        return {d for d, node in self._nodes.items() if len(node.recoveries) >= self.s.flap_threshold}
