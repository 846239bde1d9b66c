"""The gRPC edge: heartbeat streams, the admin calls, Dump pages, auth, the server with health and reflection.

Modules: `heartbeat` (the SendHeartbeat stream), `admin` (the other RPCs), `servicer` (the one
object that hands each RPC to them), `dump` and `dumpcodec` (Dump pages), `enqueue` (waiting for
room in the event queue), `problems` (rate-limited logs of bad input, INVALID_ARGUMENT),
`auth` (the caller's identity and role), `audit` (the audit trail), `server` (build_server, set_health, the health servicer), `wire` (a HeartbeatRequest
read from its bytes, for the common encoding only).
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
from supervisor_service.edge.wire import Scan, restamped, scan_heartbeat

__all__ = [
    "SERVICE_NAME",
    "DumpPages",
    "GroupColumns",
    "HealthServicer",
    "RegionSupervisorServicer",
    "Scan",
    "build_server",
    "encode_rows",
    "restamped",
    "scan_heartbeat",
    "set_health",
    "varint_lengths",
]
