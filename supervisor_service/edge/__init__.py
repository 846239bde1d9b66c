"""The gRPC edge: heartbeat streams, the admin calls, Dump pages, auth, the server with health and reflection.

Modules: `heartbeat` (the SendHeartbeat stream), `admin` (the other RPCs), `servicer` (the one
object that hands each RPC to them), `dump` and `dumpcodec` (Dump pages), `enqueue` (waiting for
room in the event queue), `problems` (rate-limited logs of bad input, INVALID_ARGUMENT),
`auth`, `server` (build_server, set_health, the health servicer).
"""

from supervisor_service.edge.dump import DumpPages
from supervisor_service.edge.dumpcodec import (
    GroupColumns,
    encode_rows,
    varint_lengths,
)
from supervisor_service.edge.server import (
    SERVICE_NAME,
    HealthServicer,
    build_server,
    set_health,
)
from supervisor_service.edge.servicer import RegionSupervisorServicer

__all__ = [
    "SERVICE_NAME",
    "DumpPages",
    "GroupColumns",
    "HealthServicer",
    "RegionSupervisorServicer",
    "build_server",
    "encode_rows",
    "set_health",
    "varint_lengths",
]
