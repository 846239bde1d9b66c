"""Leadership: one replica alone, or a lease election on etcd."""

from supervisor_service.cluster.etcd import (
    EtcdElection,
)
from supervisor_service.cluster.leadership import (
    Leadership,
    SingleLeadership,
)

__all__ = [
    "EtcdElection",
    "Leadership",
    "SingleLeadership",
]
