"""The decisions, pure: the detector and its table, events in, state changes and effects out.

Imports only the standard library and numpy (docs/design.md §9). `Supervisor` dispatches each
event to the concern that owns it (see its module); other threads read only the `CoreStatus`
it publishes after every event. Metrics are whatever satisfies `CoreMetrics`."""

from supervisor_service.core.changes import (
    AuditAppend,
    AuditEntry,
    Change,
    ClockMark,
    CountsDrop,
    CountsSet,
    InFlightDrop,
    InFlightRecord,
    InFlightSet,
    JournalAppend,
    JournalEntry,
    LegacyInFlight,
    MaintenanceSet,
    RegistryAdd,
    RegistryRemove,
    StoredState,
    TermSet,
)
from supervisor_service.core.clock import (
    Clock,
    FakeClock,
    SystemClock,
)
from supervisor_service.core.detector import (
    PhiAccrualFailureDetector,
    PhiAccrualOptions,
    phi_from,
    stats_from_sums,
)
from supervisor_service.core.effects import (
    Effect,
    PollMigration,
    SelectPeers,
    SubmitMigration,
)
from supervisor_service.core.events import (
    SUBMIT_AMBIGUOUS,
    SUBMIT_NOT_SENT,
    SUBMIT_REFUSED,
    BecomeLeader,
    Clear,
    Deregister,
    Dump,
    Event,
    Heartbeat,
    LoseLeadership,
    Register,
    ReleaseHold,
    Reset,
    SelectionDone,
    SetMaintenance,
    StatusPolled,
    Stop,
    SubmissionDone,
    Tick,
)
from supervisor_service.core.guards import (
    Guards,
    TokenBucket,
)
from supervisor_service.core.holds import HOLD_REASONS
from supervisor_service.core.logs import (
    describe,
    log_event,
)
from supervisor_service.core.options import (
    FailoverPolicy,
    GuardSettings,
    Option,
    settable_fields,
)
from supervisor_service.core.ports import PHI_BUCKETS, CoreMetrics
from supervisor_service.core.snapshot import DumpSnapshot
from supervisor_service.core.status import CoreStatus
from supervisor_service.core.supervisor import Supervisor
from supervisor_service.core.table import (
    DetectorTable,
    as_region_array,
)
from supervisor_service.core.types import (
    DONE_CATEGORIES,
    KEPT_CATEGORIES,
    DetectingRegion,
    MigrationResult,
    MigrationState,
    MigrationTask,
    Peer,
    region_label,
)

__all__ = [
    "AuditAppend",
    "AuditEntry",
    "BecomeLeader",
    "Change",
    "Clear",
    "Clock",
    "ClockMark",
    "CoreMetrics",
    "CoreStatus",
    "CountsDrop",
    "CountsSet",
    "DONE_CATEGORIES",
    "Deregister",
    "DetectingRegion",
    "DetectorTable",
    "Dump",
    "DumpSnapshot",
    "Effect",
    "Event",
    "FailoverPolicy",
    "FakeClock",
    "GuardSettings",
    "Guards",
    "HOLD_REASONS",
    "Heartbeat",
    "InFlightDrop",
    "InFlightRecord",
    "InFlightSet",
    "JournalAppend",
    "JournalEntry",
    "KEPT_CATEGORIES",
    "LegacyInFlight",
    "LoseLeadership",
    "MaintenanceSet",
    "MigrationResult",
    "MigrationState",
    "MigrationTask",
    "Option",
    "PHI_BUCKETS",
    "Peer",
    "PhiAccrualFailureDetector",
    "PhiAccrualOptions",
    "PollMigration",
    "Register",
    "RegistryAdd",
    "RegistryRemove",
    "ReleaseHold",
    "Reset",
    "SUBMIT_AMBIGUOUS",
    "SUBMIT_NOT_SENT",
    "SUBMIT_REFUSED",
    "SelectPeers",
    "SelectionDone",
    "SetMaintenance",
    "StatusPolled",
    "Stop",
    "StoredState",
    "SubmissionDone",
    "SubmitMigration",
    "Supervisor",
    "SystemClock",
    "TermSet",
    "Tick",
    "TokenBucket",
    "as_region_array",
    "describe",
    "log_event",
    "phi_from",
    "region_label",
    "settable_fields",
    "stats_from_sums",
]
