"""The gRPC clients of the real cluster's PeerLookup, Selector and RegionMigration, and their Peer conversions.

Every call has a deadline and fails with RemoteError (StaleLeaderTerm when
RegionMigration refuses the leader term). The embedded implementations are
in `embedded.py`; `build.py` picks one of the two for each service. All are
called from failover worker threads, never from the supervisor thread.
"""

from __future__ import annotations

import grpc

from supervisor_service.core import MigrationResult, MigrationState, MigrationTask, Peer
from supervisor_service.proto import pb, pb_grpc
from supervisor_service.remotes.base import RemoteError, StaleLeaderTerm
from supervisor_service.security.tls import ClientTLS, channel


def _peer_from_pb(peer: pb.Peer) -> Peer:
    return Peer(peer.id, peer.addr)


def peer_to_pb(peer: Peer) -> pb.Peer:
    """A Peer on the wire (also the edge's, for the journal it reports)."""
    return pb.Peer(id=peer.id, addr=peer.addr)


class _GrpcClient:
    """A channel to one remote service; every call has a deadline and raises RemoteError."""

    service = ""

    def __init__(self, endpoint: str, timeout_s: float, tls: ClientTLS | None = None) -> None:
        self.endpoint = endpoint
        self._timeout = timeout_s
        self._channel = channel(endpoint, tls)

    def _call(self, method: str, stub_method, request):
        try:
            return stub_method(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise RemoteError(self.service, method, code, exc.details() or "") from None

    def close(self) -> None:
        self._channel.close()


class GrpcPeerLookup(_GrpcClient):
    service = "PeerLookup"

    def __init__(self, endpoint: str, timeout_s: float, tls: ClientTLS | None = None) -> None:
        super().__init__(endpoint, timeout_s, tls)
        self._stub = pb_grpc.PeerLookupStub(self._channel)

    def get_datanode(self, datanode_id: int) -> Peer | None:
        resp = self._call("GetDatanode", self._stub.GetDatanode, pb.GetDatanodeRequest(datanode_id=datanode_id))
        return _peer_from_pb(resp.peer) if resp.found else None


class GrpcSelector(_GrpcClient):
    service = "Selector"

    def __init__(self, endpoint: str, timeout_s: float, tls: ClientTLS | None = None) -> None:
        super().__init__(endpoint, timeout_s, tls)
        self._stub = pb_grpc.SelectorStub(self._channel)

    def select(
        self, min_required_items: int, exclude_peer_ids: set[int], from_peer_id: int, region_ids: tuple[int, ...]
    ) -> list[Peer]:
        request = pb.SelectRequest(
            min_required_items=min_required_items,
            allow_duplication=True,
            exclude_peer_ids=sorted(exclude_peer_ids),
            from_peer_id=from_peer_id,
            region_ids=region_ids,
        )
        return [_peer_from_pb(p) for p in self._call("Select", self._stub.Select, request).peers]


class GrpcRegionMigration(_GrpcClient):
    service = "RegionMigration"

    def __init__(self, endpoint: str, timeout_s: float, tls: ClientTLS | None = None) -> None:
        super().__init__(endpoint, timeout_s, tls)
        self._stub = pb_grpc.RegionMigrationStub(self._channel)

    def submit(self, task: MigrationTask) -> MigrationResult:
        request = pb.SubmitRegionMigrationRequest(
            region_ids=task.region_ids,
            from_peer=peer_to_pb(task.from_peer),
            to_peer=peer_to_pb(task.to_peer),
            timeout_millis=task.timeout_ms,
            trigger_reason=pb.TRIGGER_REASON_FAILOVER,
            leader_term=task.leader_term,
            request_id=task.request_id,
        )
        try:
            resp = self._call("SubmitRegionMigration", self._stub.SubmitRegionMigration, request)
        except RemoteError as exc:
            if exc.code == "FAILED_PRECONDITION" and "term" in exc.detail.lower():
                raise StaleLeaderTerm(exc.service, exc.method, exc.code, exc.detail) from None
            raise
        return MigrationResult(
            migrated=tuple(resp.migrated),
            migrating=tuple(resp.migrating),
            region_not_found=tuple(resp.region_not_found),
            table_not_found=tuple(resp.table_not_found),
            leader_changed=tuple(resp.leader_changed),
            peer_conflict=tuple(resp.peer_conflict),
            submitted=tuple(resp.submitted),
            procedure_id=resp.procedure_id,
        )

    def status(self, procedure_id: str) -> tuple[MigrationState, str]:
        try:
            resp = self._call(
                "GetMigrationStatus",
                self._stub.GetMigrationStatus,
                pb.GetMigrationStatusRequest(procedure_id=procedure_id),
            )
        except RemoteError as exc:
            if exc.code == "NOT_FOUND":  # the status code rather than the state: the same answer
                return MigrationState.NOT_FOUND, exc.detail
            raise
        try:
            state = MigrationState(resp.state)
        except ValueError:
            state = MigrationState.UNSPECIFIED
        return state, resp.message


