"""The real service a fuzz test module shares: started once with small limits, and the calls it is fuzzed with.

`Fuzzed()` starts a real in-process service (grpc.aio, the memory store, no tick, so that the state
changes only through the calls) with limits small enough that "huge" is reachable: `LIMIT` regions
per request or heartbeat, 1 MiB messages. `call(method, raw)` sends raw bytes to any method through
a generic channel method (the server's own parsing is what is fuzzed) and returns the status;
`state()` is what a refused call must not change; `check_consistent()` asserts the service is SERVING
and a Dump of everything is consistent; `clean()` gives the next example the same state: the
`BASELINE` detectors, maintenance off.
"""

from __future__ import annotations

import grpc

from supervisor_service.proto import pb
from tests.support.readiness import serving
from tests.support.service import ServiceFactory

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]
LIMIT = 1000
FUZZ_SETTINGS = dict(
    tick_interval_ms=600_000,  # no tick: the state changes only through the calls
    max_regions_per_request=LIMIT,
    max_regions_per_heartbeat=LIMIT,
    max_message_bytes=1 << 20,
    max_dump_page_size=LIMIT,
)
RPC_TIMEOUT = 20.0
# Detectors every example starts with, so that a Dump or a Deregister has something to work on.
BASELINE = ((1, 0), (1, 1), (1, 2**64 - 1), (2**64 - 1, 5), (2**64 - 1, 2**64 - 1))


class Fuzzed:
    """The service under fuzz, a channel to it, and the generic calls of every method."""

    def __init__(self, addr: str | None = None, **settings) -> None:
        """A service started in this process with `settings`, or the one already serving at `addr`."""
        self.factory = ServiceFactory()
        if addr is None:
            addr = self.factory(**{**FUZZ_SETTINGS, **settings}).addresses.grpc
        self.channel = grpc.insecure_channel(addr)
        self._register(BASELINE)

    def call(self, method, raw: bytes) -> tuple[grpc.StatusCode, str, list[bytes]]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        try:
            if method.server_streaming:
                stream = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
                call = stream(raw, timeout=RPC_TIMEOUT)
                answers = []
                for answer in call:
                    answers.append(answer)
                    if len(answers) > 10_000:
                        call.cancel()
                        raise AssertionError(f"{path}: endless stream")
                return grpc.StatusCode.OK, "", answers
            unary = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            return grpc.StatusCode.OK, "", [unary(raw, timeout=RPC_TIMEOUT)]
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", []

    def dump(self) -> list[pb.DumpResponse]:
        code, details, pages = self.call(SERVICE.methods_by_name["Dump"], pb.DumpRequest(page_size=LIMIT)
                                         .SerializeToString())
        assert code == grpc.StatusCode.OK, (code, details)
        return [pb.DumpResponse.FromString(p) for p in pages]

    def state(self) -> tuple:
        """What a refused call must not change: the detectors and the maintenance switches."""
        pages = self.dump()
        pairs = [(d.datanode_id, d.region_id) for p in pages for d in p.detectors]
        code, details, [raw] = self.call(SERVICE.methods_by_name["GetMaintenanceMode"], b"")
        maintenance = pb.MaintenanceModeResponse.FromString(raw)
        switches = (maintenance.enabled, sorted(d.datanode_id for d in maintenance.datanodes))
        return sorted(pairs), switches

    def check_consistent(self) -> None:
        pages = self.dump()
        totals = {p.total for p in pages}
        rows = [(d.datanode_id, d.region_id) for p in pages for d in p.detectors]
        assert len(totals) <= 1, totals
        assert not pages or pages[0].total == len(rows), (pages[0].total, len(rows))
        assert len(set(rows)) == len(rows), "a detector twice in one Dump"
        assert all(p.is_leader for p in pages)
        assert serving(self.channel, timeout=5), "the service is no longer SERVING"

    def clean(self, keep=frozenset()) -> None:
        """Deregister every detector (but those of the datanodes in `keep`) and switch maintenance off:
        each example starts from the same state."""
        pairs = [(d, r) for d, r in self.state()[0] if d not in keep and (d, r) not in BASELINE]
        for i in range(0, len(pairs), LIMIT):
            chunk = [pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs[i:i + LIMIT]]
            code, details, _ = self.call(SERVICE.methods_by_name["DeregisterDetectors"],
                                         pb.DeregisterDetectorsRequest(regions=chunk).SerializeToString())
            assert code == grpc.StatusCode.OK, (code, details)
        off = SERVICE.methods_by_name["SetMaintenanceMode"]
        for datanodes in ([], self.state()[1][1]):
            for i in range(0, max(1, len(datanodes)), LIMIT):
                request = pb.SetMaintenanceModeRequest(enabled=False, datanode_ids=datanodes[i:i + LIMIT])
                code, details, _ = self.call(off, request.SerializeToString())
                assert code == grpc.StatusCode.OK, (code, details)

        self._register(BASELINE)

    def _register(self, pairs) -> None:
        request = pb.RegisterDetectorsRequest(regions=[pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs])
        code, details, _ = self.call(SERVICE.methods_by_name["RegisterDetectors"], request.SerializeToString())
        assert code == grpc.StatusCode.OK, (code, details)

    def close(self) -> None:
        self.channel.close()
        self.factory.close()
