"""The one module that imports generated protobuf code; everything else imports from here.

The generated modules are produced by `make proto` from `protos/supervisor/v1/supervisor.proto`.
"""

from __future__ import annotations

try:
    from supervisor_service._proto.supervisor.v1 import supervisor_pb2 as pb
    from supervisor_service._proto.supervisor.v1 import supervisor_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - only without `make proto`
    raise ImportError(
        "generated protobuf modules are missing: run `make proto` (or `make run` / `make test`)"
    ) from exc

# Wire-level names and limits that the service and its clients share.
LEADER_METADATA_KEY = "x-supervisor-leader"
"""Trailing metadata of a follower's FAILED_PRECONDITION: the leader's address."""
MAX_MAINTENANCE_TTL_MS = 100 * 365 * 86_400_000
"""The longest maintenance a `ttl_millis` may ask for: far beyond any real window, and far inside
what every representation of an expiry holds (int64 milliseconds, a float of seconds)."""

__all__ = ["LEADER_METADATA_KEY", "MAX_MAINTENANCE_TTL_MS", "pb", "pb_grpc"]
