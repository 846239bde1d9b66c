"""Domain types shared by the core, the remotes and the edge: peers, migration tasks and results."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

DetectingRegion = tuple[int, int]
"""(datanode_id, region_id)."""

RegionArray: TypeAlias = npt.NDArray[np.uint64]
"""Region ids of one datanode: a sorted, de-duplicated uint64 array (see `as_region_array`)."""


def region_label(region_id: int) -> str:
    """`table_id/region_number`: how an operator reads a region id (table id in the high 32 bits)."""
    return f"{region_id >> 32}/{region_id & 0xFFFFFFFF}"


@dataclass(frozen=True, slots=True)
class Peer:
    id: int
    addr: str = ""


class MigrationState(Enum):
    UNSPECIFIED = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    NOT_FOUND = 4


@dataclass(frozen=True, slots=True)
class MigrationTask:
    """One SubmitRegionMigration: regions of one datanode going to one target."""

    task_id: int
    datanode_id: int
    from_peer: Peer
    to_peer: Peer
    region_ids: tuple[int, ...]
    timeout_ms: int
    leader_term: int
    request_id: str = ""
    """The idempotency key of the decision: the same for every retry of it, by any leader."""
    trigger_reason: str = "FAILOVER"
    """FAILOVER (a failure) or MANUAL (a drain): SubmitRegionMigration's trigger_reason."""


FAILOVER, MANUAL = "FAILOVER", "MANUAL"
"""The trigger reasons of a migration task."""


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """The answer to a SubmitRegionMigration, by category (docs/design.md §4)."""

    migrated: tuple[int, ...] = ()
    migrating: tuple[int, ...] = ()
    region_not_found: tuple[int, ...] = ()
    table_not_found: tuple[int, ...] = ()
    leader_changed: tuple[int, ...] = ()
    peer_conflict: tuple[int, ...] = ()
    submitted: tuple[int, ...] = ()
    procedure_id: str = ""


# Categories after which the detector and its failover count are dropped, and those after which both are kept.
DONE_CATEGORIES = ("migrated", "region_not_found", "table_not_found", "leader_changed")


KEPT_CATEGORIES = ("migrating", "peer_conflict", "submitted")


@dataclass(frozen=True, slots=True)
class SelectJob:
    """Ask PeerLookup for the failed datanode and Selector for `len(region_ids)` targets."""

    job_id: int
    datanode_id: int
    region_ids: tuple[int, ...]
    exclude_targets: tuple[int, ...] = ()  # besides the datanode itself (flap damping, drained datanodes)
    drain_id: str = ""  # asked for a drain (core.drains), not for a failover
