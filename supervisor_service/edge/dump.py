"""Dump answers: a DumpSnapshot turned into DetectorState pages, built lazily and off the event
loop, each page encoded with numpy from per-group columns (`edge.dumpcodec`) rather than one
protobuf message per row."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np

from supervisor_service.core import DumpSnapshot
from supervisor_service.core.whatif import crossing_ms
from supervisor_service.edge.dumpcodec import GroupColumns, encode_rows
from supervisor_service.proto import pb

DEFAULT_DUMP_PAGE = 1000


async def dump_responses(
    snapshot: DumpSnapshot, at: int, only_failed: bool, page_size: int, leader_addr: Callable[[], str]
) -> AsyncIterator[pb.DumpResponse]:
    """The DumpResponse pages of `snapshot` at time `at`, `page_size` rows each; one page with the
    header alone when no row is shown."""
    loop = asyncio.get_running_loop()
    # Building rows is CPU work: do it off the event loop, page by page, so heartbeat
    # streams keep flowing and memory holds one page at a time.
    dump = await loop.run_in_executor(None, DumpPages, snapshot, at, only_failed)
    header = dict(
        is_leader=snapshot.is_leader,
        maintenance_mode=snapshot.maintenance,
        at_millis=at,
        total=dump.total,
        leader_addr=leader_addr(),
        holds=list(snapshot.holds),
    )
    if not dump.total:
        yield pb.DumpResponse(**header)
        return
    for build in dump.pages(page_size, header):
        yield await loop.run_in_executor(None, build)


class DumpPages:
    """Turns a snapshot into DetectorState pages lazily, so a dump of a million detectors
    never holds a million protobuf rows at once. phi is evaluated once per history group (the
    reference's bits), and a page is encoded with numpy from the groups' columns
    (`edge.dumpcodec`), not one Python message per row."""

    def __init__(self, snapshot: DumpSnapshot, at: int, only_failed: bool) -> None:
        self._snapshot = snapshot
        self._at = at
        threshold = snapshot.threshold
        # Failover counts per datanode as sorted region ids and their counts; migrating regions sorted.
        by_node: dict[int, dict[int, int]] = {}
        for (datanode_id, region_id), count in snapshot.failover_counts.items():
            if count:
                by_node.setdefault(datanode_id, {})[region_id] = count
        self._counts = {
            d: (np.array(sorted(c), dtype=np.uint64), [c[r] for r in sorted(c)]) for d, c in by_node.items()
        }
        self._migrating = np.array(sorted(snapshot.migrating), dtype=np.uint64)
        # (node, its groups' columns, the positions of the rows to show) per datanode.
        self._nodes = []
        self.total = 0
        for node in snapshot.nodes:
            phi = node.phis(at)
            available = phi < threshold
            if only_failed:
                positions = np.flatnonzero(~available[node.gids])
            else:
                positions = np.arange(node.regions.size)
            if positions.size:
                samples, mean, std = node.observed()
                # When each group's phi reaches the threshold if nothing arrives: a few phi per group.
                predicted = np.array([crossing_ms(g, threshold) for g in node.groups.values()], dtype=np.int64)
                columns = GroupColumns(node.last, phi, available, samples, mean, std, predicted)
                self._nodes.append((node, columns, positions))
                self.total += int(positions.size)

    def pages(self, page_size: int, header: dict | None = None):
        """Yields callables that each build one DumpResponse of `page_size` rows (the last may be
        shorter) carrying the `header` fields; run them off the event loop."""
        head = pb.DumpResponse(**(header or {})).SerializeToString()
        pending: list[tuple] = []
        room = page_size
        for node, columns, positions in self._nodes:
            start = 0
            while start < positions.size:
                chunk = positions[start : start + room]
                pending.append((node, columns, chunk))
                start += chunk.size
                room -= chunk.size
                if room == 0:
                    yield lambda parts=pending: self._page(head, parts)
                    pending, room = [], page_size
        if pending:
            yield lambda parts=pending: self._page(head, parts)

    def _page(self, head: bytes, parts: list[tuple]) -> pb.DumpResponse:
        # Serialized messages concatenate into their merge: the header fields, then the rows.
        return pb.DumpResponse.FromString(head + b"".join(self._encoded(*part) for part in parts))

    def _encoded(self, node, columns: GroupColumns, positions: np.ndarray) -> bytes:
        """The rows at `positions` of one datanode, as serialized `DumpResponse.detectors` entries."""
        regions, index = node.regions[positions], node.gids[positions]
        counts: dict[int, int] = {}
        counted = self._counts.get(node.datanode_id)
        if counted is not None:
            keys, values = counted
            at = np.minimum(np.searchsorted(keys, regions), keys.size - 1)
            for i in np.flatnonzero(keys[at] == regions).tolist():
                counts[i] = values[int(at[i])]
        migrating = set()
        if self._migrating.size:
            migrating = set(np.flatnonzero(np.isin(regions, self._migrating)).tolist())
        extras = {
            i: pb.DetectorState(failover_count=counts.get(i, 0), migrating=i in migrating).SerializeToString()
            for i in sorted(counts.keys() | migrating)
        }
        prefix = pb.DetectorState(datanode_id=node.datanode_id).SerializeToString()
        return encode_rows(prefix, regions, index, columns, extras)
