"""Who leads: one replica alone, or a lease election on etcd or PostgreSQL; `open_cluster` opens a store with its leadership."""

from supervisor_service.cluster.etcd import (
    EtcdElection,
)
from supervisor_service.cluster.leadership import (
    Leadership,
    SingleLeadership,
)
from supervisor_service.cluster.open import (
    open_cluster,
)
from supervisor_service.cluster.postgres import (
    PostgresElection,
)

__all__ = [
    "EtcdElection",
    "Leadership",
    "PostgresElection",
    "SingleLeadership",
    "open_cluster",
]
