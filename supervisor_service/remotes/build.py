"""The three remote services a supervisor uses, embedded or over gRPC, as the settings say."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor_service.core import Clock
from supervisor_service.remotes.base import PeerDirectory, PeerLookup, RegionMigration, Selector
from supervisor_service.remotes.embedded import DryRunJournal, EmbeddedPeerLookup, EmbeddedSelector
from supervisor_service.remotes.grpc import GrpcPeerLookup, GrpcRegionMigration, GrpcSelector
from supervisor_service.security.tls import ClientTLS


@dataclass(frozen=True, slots=True)
class Remotes:
    """The three services as the failover workers see them, and which ones are embedded."""

    peer_lookup: PeerLookup
    selector: Selector
    region_migration: RegionMigration
    journal: DryRunJournal | None = None

    def describe(self) -> dict[str, str]:
        def kind(obj: object) -> str:
            endpoint = getattr(obj, "endpoint", None)
            return f"remote {endpoint}" if endpoint else "embedded"

        return {
            "peer_lookup": kind(self.peer_lookup),
            "selector": kind(self.selector),
            "region_migration": kind(self.region_migration),
        }

    def close(self) -> None:
        for obj in (self.peer_lookup, self.selector, self.region_migration):
            close = getattr(obj, "close", None)
            if close is not None:
                close()


def build_remotes(
    *,
    clock: Clock,
    directory: PeerDirectory,
    selector_endpoint: str,
    peer_lookup_endpoint: str,
    region_migration_endpoint: str,
    timeout_s: float,
    alive_window_ms: int,
    journal_capacity: int,
    tls: ClientTLS | None = None,
) -> Remotes:
    journal = None if region_migration_endpoint else DryRunJournal(clock, journal_capacity)
    return Remotes(
        peer_lookup=GrpcPeerLookup(peer_lookup_endpoint, timeout_s, tls)
        if peer_lookup_endpoint
        else EmbeddedPeerLookup(directory),
        selector=GrpcSelector(selector_endpoint, timeout_s, tls)
        if selector_endpoint
        else EmbeddedSelector(directory, alive_window_ms, require_addr=bool(region_migration_endpoint)),
        region_migration=GrpcRegionMigration(region_migration_endpoint, timeout_s, tls)
        if region_migration_endpoint
        else journal,
        journal=journal,
    )
