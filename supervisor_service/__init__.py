"""Region failover supervisor: phi-accrual failure detection per (datanode, region) and failover.

Public modules: `detector` (the scalar reference detector), `table` (the
detector table), `events`, `supervisor` (the decisions), `runtime` (threads),
`server` (gRPC edge), `remotes` (Selector, PeerLookup, RegionMigration),
`settings`, `metrics`, `client`, `app` (wiring), `cli`.
"""

from supervisor_service.detector import PhiAccrualFailureDetector, PhiAccrualOptions

__all__ = ["PhiAccrualFailureDetector", "PhiAccrualOptions"]
__version__ = "0.1.0"
