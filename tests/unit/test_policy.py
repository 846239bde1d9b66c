"""Roles (DESIGN.md section 8): which RPC needs which role, every RPC of the service covered, and the
policy file validated with one line naming the file and the entry."""

from __future__ import annotations

import json

import pytest
from grpc_health.v1 import health_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor_service.proto import pb
from supervisor_service.security.policy import (
    OPEN,
    OPEN_POLICY,
    ROLES,
    PolicyError,
    datanode_of,
    load_policy,
    may_call,
    parse_policy,
    required_role,
)
from tests.support.roles import DATANODE_RPCS, METASRV_RPCS, OPERATOR_RPCS, READER_RPCS, allowed

SERVICE = pb.DESCRIPTOR.services_by_name["RegionSupervisor"]

def test_every_rpc_of_the_service_has_a_role():
    """Fails when an RPC is added that neither the name rule nor the explicit list covers (it would be
    admin only): give it its role in security/policy.py."""
    missing = [m.name for m in SERVICE.methods if required_role(SERVICE.full_name, m.name) is None]
    assert not missing, f"RPCs without a role: {missing}"


@pytest.mark.parametrize("role", [*ROLES, None])
@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_each_role_may_call_exactly_its_rpcs(role, method):
    needed = required_role(SERVICE.full_name, method)
    assert may_call(role, needed) is allowed(role, method), (role, method, needed)


def test_rpcs_of_the_table_not_yet_in_the_service_fall_in_place():
    for method in READER_RPCS | METASRV_RPCS | OPERATOR_RPCS | DATANODE_RPCS:
        needed = required_role(SERVICE.full_name, method)
        assert needed is not None, method
        assert [r for r in ROLES if may_call(r, needed)] == [r for r in ROLES if allowed(r, method)], method


def test_an_unknown_rpc_is_admin_only():
    needed = required_role(SERVICE.full_name, "DropEverything")
    assert needed is None
    assert [r for r in ROLES if may_call(r, needed)] == ["admin"]
    assert not may_call(None, needed)


def test_health_is_open_to_anyone_and_reflection_is_a_reader_call():
    health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    for method in ("Check", "Watch", "List"):
        assert required_role(health, method) == OPEN
        assert may_call(None, OPEN)
    for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
        needed = required_role(service, "ServerReflectionInfo")
        assert [r for r in ROLES if may_call(r, needed)] == ["metasrv", "operator", "reader", "admin"]


@pytest.mark.parametrize(("identity", "expected"), [
    ("datanode-1", 1), ("datanode-42.rack3.example.com", 42), ("DATANODE-7", 7), ("datanode-0", 0),
    ("datanode-18446744073709551615", 2**64 - 1), ("datanode-18446744073709551616", None),
    ("datanode-", None), ("datanode-1a", None), ("xdatanode-1", None), ("rack.datanode-1", None),
    ("datanode-1-old", None), ("metasrv", None), ("", None), ("datanode-" + "9" * 100, None),
])
def test_datanode_of_reads_the_first_dns_label(identity, expected):
    assert datanode_of(identity) == expected


POLICY = '''
bind_datanode_ids = true

[roles]
"datanode-*" = "datanode"
metasrv = "metasrv"
"ops-root" = "admin"
"ops-*" = "operator"
"*.readers.example" = "reader"
"*" = "reader"
'''


def test_first_match_wins_in_the_file_order():
    policy = parse_policy(POLICY, "p.toml")
    assert policy.role_of("datanode-3") == "datanode"
    assert policy.role_of("ops-root") == "admin"
    assert policy.role_of("ops-alice") == "operator"
    assert policy.role_of("grafana.readers.example") == "reader"
    assert policy.role_of("anyone") == "reader"
    assert policy.bind_datanode_ids
    assert parse_policy('[roles]\n"ops-*" = "operator"\n', "p").role_of("metasrv") is None
    assert parse_policy('bind_datanode_ids = false\n[roles]\n"*" = "datanode"\n', "p").bind_datanode_ids is False


def test_no_policy_file_lets_any_authenticated_caller_call_anything():
    assert OPEN_POLICY.role_of("whoever") == "admin"
    assert OPEN_POLICY.bind_datanode_ids


@pytest.mark.parametrize(("text", "words"), [
    ('[roles]\n"ops-*" = "superuser"\n', ["'ops-*'", "unknown role 'superuser'"]),
    ('[roles]\n"ops *" = "operator"\n', ["'ops *'", "not a valid identity glob"]),
    ('[roles]\n"ops-[abc" = "operator"\n', ["'ops-[abc'", "not a valid identity glob"]),
    ('[roles]\n"" = "operator"\n', ["''", "not a valid identity glob"]),
    ('[roles]\nops.alice = "operator"\n', ["'ops'", "is a table"]),
    ('[roles]\n"ops-*" = 3\n', ["'ops-*'", "unknown role 3"]),
    ('bind_datanode_ids = "no"\n[roles]\n"*" = "reader"\n', ["bind_datanode_ids must be true or false"]),
    ('[rolez]\n"*" = "reader"\n', ["unknown key 'rolez'"]),
    ('bind_datanode_ids = false\n', ["no [roles] table"]),
    ('[roles\n', ["not valid TOML"]),
])
def test_a_bad_policy_is_one_line_naming_the_file_and_the_entry(tmp_path, text, words):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"policy file {path}: ") and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_a_policy_file_that_cannot_be_read_says_so(tmp_path):
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[roles]")
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "bin.toml")


def test_a_policy_with_too_many_entries_is_refused():
    text = "[roles]\n" + "".join(f'"id-{i}" = "reader"\n' for i in range(1001))
    with pytest.raises(PolicyError, match="at most 1000"):
        parse_policy(text, "p")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_policy_or_one_line_policy_error(text):
    try:
        policy = parse_policy(text, "p.toml")
    except PolicyError as exc:
        assert str(exc).startswith("policy file p.toml: ") and "\n" not in str(exc), str(exc)
        return
    assert all(role in ROLES for _, role in policy.rules)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(st.text(max_size=12), st.integers(), st.booleans()),
                       max_size=6), st.sampled_from([True, False, "yes", 1]))
def test_any_roles_table_is_a_policy_or_a_policy_error(roles, bind):
    lines = [f"bind_datanode_ids = {json.dumps(bind)}", "[roles]"]
    lines += [f"{json.dumps(glob)} = {json.dumps(role)}" for glob, role in roles.items()]
    try:
        policy = parse_policy("\n".join(lines) + "\n", "p.toml")
    except PolicyError as exc:
        assert str(exc).startswith("policy file p.toml: ") and "\n" not in str(exc), str(exc)
        return
    assert [g for g, _ in policy.rules] == list(roles) and isinstance(policy.bind_datanode_ids, bool)
    for glob, _ in policy.rules:
        policy.role_of(glob)  # a glob matches without raising
