"""What the core asks the runtime to do: remote calls, each answered by a result event (docs/design.md §3)."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor_service.core.types import (
    MigrationTask,
    SelectJob,
)


@dataclass(frozen=True, slots=True)
class SelectPeers:
    """Run PeerLookup(datanode) and Selector.Select for the job; answer with SelectionDone."""

    job: SelectJob


@dataclass(frozen=True, slots=True)
class SubmitMigration:
    """Run RegionMigration.SubmitRegionMigration; answer with SubmissionDone."""

    task: MigrationTask


@dataclass(frozen=True, slots=True)
class PollMigration:
    """Run RegionMigration.GetMigrationStatus; answer with StatusPolled."""

    procedure_id: str


Effect = SelectPeers | SubmitMigration | PollMigration
