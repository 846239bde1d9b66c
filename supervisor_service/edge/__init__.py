"""The gRPC edge: heartbeat streams, the admin calls, Dump pages, auth, the server with health and reflection."""

from supervisor_service.edge.dumpcodec import (
    encode_rows,
    varint_lengths,
)
from supervisor_service.edge.server import (
    DumpPages,
    RegionSupervisorServicer,
    build_server,
    set_health,
)

__all__ = [
    "DumpPages",
    "RegionSupervisorServicer",
    "build_server",
    "encode_rows",
    "set_health",
    "varint_lengths",
]
