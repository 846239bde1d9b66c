"""The audit trail is state like the rest: it survives a restart of a single replica on SQLite (a
leader change on etcd and PostgreSQL: test_ha.py), and stays within its capacity."""

from __future__ import annotations

import grpc
import pytest

from supervisor_service.client import SupervisorClient
from supervisor_service.core import AuditAppend, AuditEntry
from tests.support.backends import EtcdBackend
from tests.support.roles import IDENTITIES, write_security_files
from tests.support.service import ServiceFactory

ALICE, BOB = IDENTITIES["ops-alice"][0], IDENTITIES["reader-bob"][0]


def _trail(svc, **query):
    with SupervisorClient(svc.addresses.grpc, token=BOB, timeout=5) as client:
        return [(e.identity, e.rpc, e.code, e.reason, e.leader_term) for e in client.audit(limit=1000, **query)]


def test_the_trail_survives_a_restart_on_sqlite(tmp_path):
    settings = dict(store="sqlite", data_dir=str(tmp_path / "data"), **write_security_files(tmp_path / "security"))
    first = ServiceFactory()
    try:
        svc = first(**settings)
        with SupervisorClient(svc.addresses.grpc, token=ALICE, timeout=5) as client:
            client.set_maintenance(True, reason="upgrade of rack 3")
        with SupervisorClient(svc.addresses.grpc, token=BOB, timeout=5) as client, pytest.raises(grpc.RpcError):
            client.set_maintenance(False)
        svc.store.flush()  # the refusal's entry is handed to the writer, not waited for
        before = _trail(svc)
    finally:
        first.close()
    assert [e[:4] for e in before] == [("reader-bob", "SetMaintenanceMode", "PERMISSION_DENIED", ""),
                                       ("ops-alice", "SetMaintenanceMode", "OK", "upgrade of rack 3")]
    second = ServiceFactory()
    try:
        svc = second(**settings)
        assert _trail(svc) == before
        with SupervisorClient(svc.addresses.grpc, token=ALICE, timeout=5) as client:
            client.set_maintenance(False, reason="rack 3 done")
        after = _trail(svc)
        assert after[1:] == before and after[0][3] == "rack 3 done" and after[0][4] > before[0][4]
        assert _trail(svc, identity="ops-alice") == [after[0], before[1]]
    finally:
        second.close()


def test_the_trail_keeps_its_capacity_newest_first(service, tmp_path):
    svc = service(audit_capacity=5, **write_security_files(tmp_path))
    with SupervisorClient(svc.addresses.grpc, token=ALICE, timeout=5) as client:
        for i in range(12):
            client.set_maintenance(i % 2 == 0, reason=f"step {i}")
    assert [e[3] for e in _trail(svc)] == [f"step {i}" for i in range(11, 6, -1)]


def test_a_trail_larger_than_one_etcd_answer_does_not_stop_a_leader_loading(service, etcd):
    svc = service(store=EtcdBackend(etcd).store(), audit_capacity=4000)
    term = svc.leadership.term
    big = "r" * 1000  # about 1.3 KB an entry: 4,000 of them are over etcd's 4 MiB answer
    for i in range(4000):
        svc.store.submit([AuditAppend(AuditEntry(i, "ops-alice", "", "SetMaintenanceMode", "s", "OK", big, term))],
                         term=term)
    svc.store.flush(60)
    svc.store.load()  # what a new leader does (a StoreError when the trail was under the prefix: 4.9 MB > 4 MiB)
    with SupervisorClient(svc.addresses.grpc, token="", timeout=10) as client:
        client.set_maintenance(True, reason="after the big trail")  # appended after the 4,000th
