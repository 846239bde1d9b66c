"""An aetcd client over TLS (`etcds://`; docs/design.md §14.1).

aetcd 1.0.0 opens only plaintext channels (`Client.connect` calls `grpc.aio.insecure_channel`) and
takes no credentials. This client makes the same stubs on a `grpc.aio.secure_channel` instead; the
rest of aetcd (KV, transactions, leases, the watcher) works on whatever channel it is given. It
relies on aetcd's attribute names (`channel`, `kvstub`, `_watcher`, ...): the TLS etcd test
(tests/integration/test_tls_remotes.py) fails if a new aetcd renames them.
"""

from __future__ import annotations

import aetcd
from aetcd import rpc, watcher

from supervisor_service.security.tls import ClientTLS, aio_channel


class TLSClient(aetcd.Client):
    """`aetcd.Client` on a TLS channel (server verified against `tls.ca_file`, client certificate if given)."""

    def __init__(self, host: str, port: int, tls: ClientTLS, timeout: float | None = None) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = aio_channel(f"{self._host}:{self._port}", self._tls, list(self._options.items()))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()
