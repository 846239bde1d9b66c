"""The option dataclasses of the core, each field defined once (docs/design.md §8).

Every field of `FailoverPolicy`, `GuardSettings` (here) and `PhiAccrualOptions`
(core/detector.py) is declared with `option(...)`: its default, the bounds a
setting of it must respect, and its meaning. `app/settings.py` builds the
service's settings from these declarations (the same default, bounds and
text, which the README's configuration table shows), so none of them is
written twice. The dataclasses themselves hold plain values and check no
bounds: tests and the evaluation build them directly, with any value.

Standard library only: the core imports no pydantic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")

OPTION = "option"
"""The key of a field's `Option` in its dataclass field metadata."""


@dataclass(frozen=True, slots=True)
class Option:
    """What is known of one option field besides its type and default."""

    doc: str
    """Its meaning, as `supervisor-service settings --markdown` and the README show it."""
    setting: str | None = None
    """The setting that sets it, when its name is not the field's."""
    settable: bool = True
    """False: no setting of its own; the service derives it from other settings, or keeps the default."""
    ge: float | None = None
    """A setting of it is at least this (None: no such bound)."""
    gt: float | None = None
    """A setting of it is more than this."""
    le: float | None = None
    """A setting of it is at most this: what the code can hold, not what is sensible."""
    setting_default: object = None
    """The setting's default, when the service's is not the dataclass's (None: the same)."""


def option(
    default: T,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    setting: str | None = None,
    setting_default: T | None = None,
) -> T:
    """A field that a setting sets: `default`, the bounds of the setting, and `doc`."""
    meta = Option(doc, setting=setting, ge=ge, gt=gt, le=le, setting_default=setting_default)
    return field(default=default, metadata={OPTION: meta})


def derived(default: T, doc: str) -> T:
    """A field without a setting of its own (the service derives it, or keeps `default`)."""
    return field(default=default, metadata={OPTION: Option(doc, settable=False)})


def option_of(f: Field[Any]) -> Option:
    """The `Option` of a field declared with `option` or `derived`."""
    meta: Option = f.metadata[OPTION]
    return meta


def settable_fields(cls: type[Any]) -> Iterator[tuple[Field[Any], str, Option]]:
    """(field, setting name, option) of each field of the option dataclass `cls` that a setting sets."""
    for f in fields(cls):
        opt = option_of(f)
        if opt.settable:
            yield f, opt.setting or f.name, opt


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Failover parameters (plain values, so tests build them directly; docs/design.md §4)."""

    base_timeout_ms: int = option(
        120_000, ge=1, le=86_400_000, setting="migration_base_timeout_ms",
        doc="Migration timeout per failover: timeout = this x (the region's count of accepted failovers + 1).",
    )  # GreptimeDB: 120 s
    max_failover_timeout_ms: int = option(
        1_200_000, ge=1, le=7 * 86_400_000,
        doc="Cap of that timeout (at least migration_base_timeout_ms).",
    )  # a region failed over many times does not get a timeout of hours
    submit_retry_backoff_ms: int = option(
        1000, ge=1, le=3_600_000,
        doc="A SubmitRegionMigration that may have happened (timeout, UNAVAILABLE, ...) is sent again, to the "
        "same target with the same request_id, after this, doubling per retry ...",
    )
    submit_retry_backoff_max_ms: int = option(30_000, ge=1, le=3_600_000, doc="... up to this.")
    resubmit_backoff_ms: int = option(
        10_000, ge=0, le=86_400_000,
        doc="Regions whose decision ended without moving them (GetMigrationStatus NOT_FOUND or FAILED, "
        "peer_conflict, a refused call) wait this long before they are failed over again, doubling per such "
        "end in the window ...",
    )
    resubmit_backoff_max_ms: int = option(300_000, ge=0, le=86_400_000, doc="... up to this.")
    max_resubmissions_per_window: int = option(
        3, ge=1, le=1_000_000, doc="At most this many such resubmissions of a region per resubmit_window_ms."
    )
    resubmit_window_ms: int = option(600_000, ge=1, le=7 * 86_400_000, doc="The window of that limit.")
    expiry_checkpoint_interval_ms: int = option(
        15_000, ge=100, le=3_600_000,
        doc="While a maintenance expiry is pending, the time it has left is stored this often: after a restart "
        "on another machine or boot it ends at most this plus the time without a leader late, never early.",
    )
    require_target_addr: bool = derived(
        False,
        "A Selector answer with a target without an address is invalid (set when the Selector or the "
        "RegionMigration service is remote).",
    )
    watch_target_on_success: bool = derived(
        True,
        "A migration that SUCCEEDED watches its regions on the target from then on (off with the embedded "
        "dry-run RegionMigration: it moves nothing, so the target never reports them).",
    )
    status_poll_interval_ms: int = option(
        5000, ge=1, le=3_600_000, setting="migration_status_poll_interval_ms",
        doc="How often an in-flight migration's status is polled.",
    )
    log_interval_ms: int = derived(60_000, "Minimum interval between repeated 'failover held' log lines.")
    warmup_grace_ms: int = option(
        30_000, ge=0, le=86_400_000,
        doc="After becoming leader, no failover for this long, unless warmup_fraction of the known datanodes "
        "reported first.",
    )
    warmup_fraction: float = option(
        0.9, ge=0, le=1, doc="Fraction of the known datanodes that, once heard from, ends the warm-up early."
    )
    # The plain policy never forgets (0); the service forgets after 30 min while the guards are on.
    failover_count_decay_ms: int = option(
        0, ge=0, le=2_592_000_000, setting_default=1_800_000,
        doc="A region healthy this long after its last failover forgets its failover count [0].",
    )
    rebaseline_after_maintenance: bool = option(
        True, doc="When maintenance ends, give the detectors it covered a fresh heartbeat at now."
    )
    drain_regions_per_s: float = option(
        200.0, gt=0, le=1_000_000, doc="Budget of regions a drain (DrainDatanodes) submits per second, all drains together."
    )
    drain_burst_regions: int = option(200, ge=1, le=1_000_000, doc="Burst of the drain budget.")
    drain_max_attempts: int = option(
        3, ge=1, le=1000,
        doc="A drained region whose migrations end this many times without moving it (FAILED, NOT_FOUND, "
        "timed out, refused, peer_conflict) is given up on: the drain ends failed, naming it and why.",
    )

    @property
    def timeout_cap_ms(self) -> int:
        """The longest migration timeout: max_failover_timeout_ms, and never below the base."""
        return max(self.max_failover_timeout_ms, self.base_timeout_ms)

    def failover_timeout_ms(self, count: int) -> int:
        """The timeout of a migration whose regions' highest failover count, this one included, is `count`."""
        return min(self.base_timeout_ms * max(count, 1), self.timeout_cap_ms)
    failover_history_capacity: int = option(
        1000, ge=1, le=1_000_000,
        doc="Failover decisions the history keeps (newest), with their evidence (ListFailovers, `history`).",
    )


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """Guard parameters; each guard is off at the value in brackets (docs/design.md §5)."""

    # Also the ticker's period: a gap between ticks beyond it counts as a stall.
    tick_interval_ms: int = option(1000, ge=10, le=600_000, doc="How often failed regions are looked for.")
    max_local_pause_ms: int = option(
        5000, ge=0, le=3_600_000, doc="A stall of the supervisor itself longer than this holds convictions [0]."
    )
    # Long enough for every datanode to have a fair chance to be heard again.
    local_pause_hold_ms: int = option(
        5000, ge=0, le=3_600_000, doc="How long convictions stay held after such a stall."
    )
    overload_queue_fraction: float = option(
        0.9, gt=0, le=1, doc="No conviction while the event queue is fuller than this [1]."
    )
    # A refused heartbeat is liveness evidence the table never saw, and the queue can be empty again
    # by the next tick (a burst refused, then drained): the hold outlasts the refusal by as long as
    # a stall's, for the same reason (every datanode gets a fair chance to be heard again).
    overload_hold_ms: int = option(
        5000, ge=0, le=3_600_000,
        doc="After a tick learns that heartbeats found no room in the event queue (refused, or left waiting "
        "for room), convictions stay held this long [0: only while the queue is fuller than "
        "overload_queue_fraction].",
    )
    max_failed_datanode_fraction: float = option(
        0.5, gt=0, le=1, doc="Hold failover while more than this fraction of the datanodes are silent [1]."
    )
    mass_failure_min_datanodes: int = option(3, ge=1, le=1_000_000, doc="... and at least this many datanodes are.")
    # Shorter than the detection period on purpose: datanodes cut off together cross the phi
    # threshold one or two ticks apart (their last heartbeats were spread over an interval), and
    # the first must not be failed over before the others are counted.
    mass_failure_silence_ms: int = option(
        5000, ge=1, le=3_600_000,
        doc="A datanode unheard for this long counts as silent for the mass-failure guard (capped at half the "
        "acceptable heartbeat pause, so datanodes cut together are counted before the first is convicted).",
    )
    # Datanodes cut off together come back over a heartbeat interval, not at once: without this,
    # the first ones back drop the fraction below the limit and the rest, a moment from
    # reporting, are failed over.
    mass_failure_recovery_ms: int = option(
        5000, ge=0, le=3_600_000,
        doc="After a mass failure clears, failover stays held this long, so the datanodes cut off with the "
        "others can report again [0].",
    )
    failover_rate_per_s: float = option(
        1.0, ge=0, le=1_000_000, doc="Global budget of datanodes failed over per second [0]."
    )
    failover_burst: int = option(10, ge=1, le=1_000_000, doc="Burst of the global budget.")
    target_regions_per_s: float = option(
        200.0, ge=0, le=100_000_000, doc="Regions moved to one target datanode per second [0]."
    )
    target_burst_regions: int = option(2000, ge=1, le=100_000_000, doc="Burst of the per-target budget.")
    target_holddown_ms: int = option(
        30_000, ge=0, le=86_400_000, doc="A datanode that failed or flaps is not a failover target for this long [0]."
    )
    flap_window_ms: int = option(
        600_000, ge=1, le=604_800_000, doc="Window in which a datanode's recoveries and failovers are counted."
    )
    flap_threshold: int = option(
        3, ge=1, le=1_000_000, doc="Recoveries within the window that make a datanode count as flapping."
    )
    flap_backoff_base_ms: int = option(
        10_000, ge=0, le=86_400_000,
        doc="A datanode failing again within the window waits base x 2^(n-1) before its next failover [0].",
    )
    flap_backoff_max_ms: int = option(300_000, ge=0, le=86_400_000, doc="Cap of that backoff.")
