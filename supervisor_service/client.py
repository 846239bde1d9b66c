"""A small synchronous client of the RegionSupervisor service, for the CLI, tools and tests."""

from __future__ import annotations

import grpc

from supervisor_service.events import DetectingRegion
from supervisor_service.proto import pb, pb_grpc


class SupervisorClient:
    def __init__(self, addr: str, *, token: str = "", timeout: float = 10.0) -> None:
        self.addr = addr
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(addr)
        self.stub = pb_grpc.RegionSupervisorStub(self._channel)

    def __enter__(self) -> SupervisorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _kw(self) -> dict:
        return {"timeout": self._timeout, "metadata": self._metadata}

    @staticmethod
    def _regions(pairs: list[DetectingRegion]) -> list[pb.DetectingRegion]:
        return [pb.DetectingRegion(datanode_id=d, region_id=r) for d, r in pairs]

    def register(self, pairs: list[DetectingRegion]) -> int:
        return self.stub.RegisterDetectors(pb.RegisterDetectorsRequest(regions=self._regions(pairs)), **self._kw()).affected

    def deregister(self, pairs: list[DetectingRegion]) -> int:
        return self.stub.DeregisterDetectors(pb.DeregisterDetectorsRequest(regions=self._regions(pairs)), **self._kw()).affected

    def reset(self, pairs: list[DetectingRegion]) -> int:
        return self.stub.ResetDetectors(pb.ResetDetectorsRequest(regions=self._regions(pairs)), **self._kw()).affected

    def dump(
        self, *, datanode_ids: list[int] = (), only_failed: bool = False, at_millis: int = 0, page_size: int = 0
    ) -> tuple[pb.DumpResponse, list[pb.DetectorState]]:
        """(first page header, all rows)."""
        request = pb.DumpRequest(
            datanode_ids=list(datanode_ids), only_failed=only_failed, at_millis=at_millis, page_size=page_size
        )
        header, rows = None, []
        for page in self.stub.Dump(request, **self._kw()):
            header = header or page
            rows.extend(page.detectors)
        return header or pb.DumpResponse(), rows

    def set_maintenance(self, enabled: bool) -> bool:
        return self.stub.SetMaintenanceMode(pb.SetMaintenanceModeRequest(enabled=enabled), **self._kw()).enabled

    def get_maintenance(self) -> bool:
        return self.stub.GetMaintenanceMode(pb.GetMaintenanceModeRequest(), **self._kw()).enabled

    def journal(self, limit: int = 100) -> tuple[bool, list[pb.JournalEntry]]:
        resp = self.stub.ListJournal(pb.ListJournalRequest(limit=limit), **self._kw())
        return resp.embedded, list(resp.entries)
