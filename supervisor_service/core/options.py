"""The option dataclasses of the core (plain values; the settings build them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Failover parameters (plain values, so tests build them directly)."""

    base_timeout_ms: int = 120_000
    """Migration timeout per failover: `timeout = base * (max(count) + 1)` (GreptimeDB: 120 s)."""
    max_failover_timeout_ms: int = 1_200_000
    """... at most this (a region failed over many times does not get a timeout of hours)."""
    submit_retry_backoff_ms: int = 1000
    """A SubmitRegionMigration that may have happened is retried after this, doubling per retry ..."""
    submit_retry_backoff_max_ms: int = 30_000
    """... up to this; always to the same target with the same request_id."""
    resubmit_backoff_ms: int = 10_000
    """After GetMigrationStatus said NOT_FOUND, the regions wait this long before a new submission,
    doubling with each NOT_FOUND in the window ..."""
    resubmit_backoff_max_ms: int = 300_000
    """... up to this."""
    max_resubmissions_per_window: int = 3
    """At most this many resubmissions after NOT_FOUND per region within `resubmit_window_ms`."""
    resubmit_window_ms: int = 600_000
    """The window of that limit."""
    expiry_checkpoint_interval_ms: int = 15_000
    """While a maintenance expiry is pending, the time it has left is stored this often (one key)."""
    require_target_addr: bool = False
    """A Selector answer with a target without an address is invalid (set for a remote Selector)."""
    status_poll_interval_ms: int = 5_000
    """How often an in-flight migration's status is asked for."""
    log_interval_ms: int = 60_000
    """Minimum interval between repeated 'failover held' log lines."""
    warmup_grace_ms: int = 30_000
    """After becoming leader, no failover for this long ..."""
    warmup_fraction: float = 0.9
    """... or until this fraction of the known datanodes has been heard from, whichever comes first."""
    failover_count_decay_ms: int = 0
    """A region healthy this long after its last failover forgets its failover count (0: never)."""
    rebaseline_after_maintenance: bool = True
    """When maintenance ends, every detector it covered gets a fresh heartbeat at now."""


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """Guard parameters; each guard is off at its documented off value."""

    tick_interval_ms: int = 1000
    """The ticker's period (a gap between ticks beyond it counts as a stall)."""
    max_local_pause_ms: int = 5000
    """A supervisor stall longer than this holds convictions (0: off)."""
    local_pause_hold_ms: int = 5000
    """How long convictions stay held after a stall: a fair chance for every datanode to be heard again."""
    overload_queue_fraction: float = 0.9
    """No conviction while the event queue is fuller than this (1: off)."""
    max_failed_datanode_fraction: float = 0.5
    """Hold failover while more than this fraction of the datanodes are silent (1: off)."""
    mass_failure_min_datanodes: int = 3
    """... and at least this many are."""
    mass_failure_silence_ms: int = 5000
    """A datanode unheard for this long counts towards the mass-failure fraction.

    Shorter than the detection period on purpose: datanodes cut off together
    cross the phi threshold one or two ticks apart (their last heartbeats were
    spread over an interval), and the first must not be failed over before the
    others are counted.
    """
    mass_failure_recovery_ms: int = 5000
    """After a mass failure clears, failover stays held this long (0: off).

    Datanodes cut off together come back over a heartbeat interval, not at
    once: without this, the first ones back drop the fraction below the limit
    and the rest, a moment from reporting, are failed over.
    """
    failover_rate_per_s: float = 1.0
    """Global budget: datanodes failed over per second (0: unlimited)."""
    failover_burst: int = 10
    """Global budget: burst of datanodes failed over at once."""
    target_regions_per_s: float = 200.0
    """Per target datanode: regions moved to it per second (0: unlimited)."""
    target_burst_regions: int = 2000
    """Per target datanode: burst of regions moved to it at once."""
    target_holddown_ms: int = 30_000
    """A datanode that failed, or flaps, is not a failover target for this long (0: off)."""
    flap_window_ms: int = 600_000
    """Window in which recoveries and repeated failovers of a datanode are counted."""
    flap_threshold: int = 3
    """Recoveries within the window that make a datanode count as flapping."""
    flap_backoff_base_ms: int = 10_000
    """A datanode failed over again within the window waits base x 2^(n-1) after failing (0: off)."""
    flap_backoff_max_ms: int = 300_000
    """Cap of that backoff."""
