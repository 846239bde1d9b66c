"""Selector, PeerLookup and RegionMigration: over gRPC, or embedded in this process."""

from supervisor_service.remotes.base import (
    PeerDirectory,
    RemoteError,
    StaleLeaderTerm,
)
from supervisor_service.remotes.build import (
    Remotes,
    build_remotes,
)
from supervisor_service.remotes.embedded import (
    DryRunJournal,
    EmbeddedPeerLookup,
    EmbeddedSelector,
)
from supervisor_service.remotes.grpc import (
    GrpcRegionMigration,
    peer_to_pb,
)

__all__ = [
    "DryRunJournal",
    "EmbeddedPeerLookup",
    "EmbeddedSelector",
    "GrpcRegionMigration",
    "PeerDirectory",
    "RemoteError",
    "Remotes",
    "StaleLeaderTerm",
    "build_remotes",
    "peer_to_pb",
]
