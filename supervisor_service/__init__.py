"""Region failover supervisor: phi-accrual failure detection per (datanode, region), and failover.

The packages, from the inside out (docs/design.md §9):

- `core`: the decisions, pure (standard library and numpy only): the detector, the detector table,
  events, effects, state changes, the guards and the supervisor;
- `runtime`: the event queue, the supervisor thread, the effect runner, the ticker;
- `store`: key-value backends, the codec, the group-commit writer;
- `cluster`: leadership (one replica, or an etcd election);
- `remotes`: Selector, PeerLookup and RegionMigration, over gRPC or embedded;
- `edge`: the gRPC servicer, heartbeat streams, Dump pages, auth;
- `app`: settings, metrics, logging, the `Service` that wires it all;
- `cli`, `client`, `evaluate`, `bench`.

The names below are the public API; they load on first use, so that importing `core` alone loads
neither grpc, protobuf, pydantic nor prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "PhiAccrualFailureDetector": "supervisor_service.core",
    "PhiAccrualOptions": "supervisor_service.core",
    "DetectorTable": "supervisor_service.core",
    "Supervisor": "supervisor_service.core",
    "Service": "supervisor_service.app.service",
    "Settings": "supervisor_service.app.settings",
    "SupervisorClient": "supervisor_service.client",
    "DatanodeHeartbeater": "supervisor_service.client",
    "main": "supervisor_service.cli",
}

__all__ = [
    "DatanodeHeartbeater",
    "DetectorTable",
    "PhiAccrualFailureDetector",
    "PhiAccrualOptions",
    "Service",
    "Settings",
    "Supervisor",
    "SupervisorClient",
    "main",
]

if TYPE_CHECKING:
    from supervisor_service.app.service import Service
    from supervisor_service.app.settings import Settings
    from supervisor_service.cli import main
    from supervisor_service.client import DatanodeHeartbeater, SupervisorClient
    from supervisor_service.core import DetectorTable, PhiAccrualFailureDetector, PhiAccrualOptions, Supervisor


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor_service' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
