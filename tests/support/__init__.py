"""The test harness, one module per concern (tests import from the module):

- `waiting`: `wait_for(predicate, timeout)`; `handled(svc)` and `wait_ticks(svc, n, timeout)`, the
  ticks the supervisor thread has handled, for negative checks that must not pass on a stuck service;
- `readiness`: `free_port()`; `wait_ready(addr, timeout, leader=...)`: SERVING over grpc.health.v1,
  and leading with its state loaded when asked;
- `service`: `ServiceFactory`, the in-process `Service` behind the `service` fixture;
- `servers`: real processes: `ServiceProcess` (`supervisor-service serve`), `EtcdServer`;
- `fakes`: the remote services (RegionMigration, Selector, PeerLookup) as in-process gRPC servers;
- `datanodes`: datanode threads heartbeating over real gRPC (`Cluster`, `regions_of`);
- `kv`: a key-value backend whose commits fail, or wait, when the test says;
- `proxy`: a TCP proxy a test can pause (a cut link).
"""
