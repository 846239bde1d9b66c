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

__all__ = ["pb", "pb_grpc"]
