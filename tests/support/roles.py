"""DESIGN.md section 8's role table written out per RPC (as a person reads it, not derived from the
code), and a tokens file and a policy file for a service under test."""

from __future__ import annotations

import hashlib
from pathlib import Path

READER_RPCS = frozenset({"Dump", "GetMaintenanceMode", "GetFailoverHolds", "ListJournal", "ListAudit",
                         "ListFailovers", "Explain", "WhatIf", "GetDrain", "ListTablePolicies"})
METASRV_RPCS = frozenset({"RegisterDetectors", "DeregisterDetectors", "ResetDetectors"})
OPERATOR_RPCS = frozenset({"SetMaintenanceMode", "ReleaseFailoverHold", "DrainDatanodes", "CancelDrain",
                           "SetTablePolicy"})
DATANODE_RPCS = frozenset({"SendHeartbeat"})
ALLOWED = {
    "datanode": DATANODE_RPCS,
    "reader": READER_RPCS,
    "metasrv": METASRV_RPCS | READER_RPCS,
    "operator": OPERATOR_RPCS | READER_RPCS,
}


def allowed(role: str | None, method: str) -> bool:
    return role == "admin" or (role is not None and method in ALLOWED[role])


# identity -> (token, role in POLICY)
IDENTITIES = {
    "datanode-1": ("dn1-token", "datanode"),
    "datanode-2": ("dn2-token", "datanode"),
    "metasrv": ("metasrv-token", "metasrv"),
    "ops-alice": ("alice-token", "operator"),
    "reader-bob": ("bob-token", "reader"),
    "admin": ("admin-token", "admin"),
    "stranger": ("stranger-token", None),
}
LEGACY_TOKEN = "legacy-shared-token"  # the auth_token setting: identity `token`, a reader below

POLICY = '''
[roles]
"datanode-*" = "datanode"
metasrv = "metasrv"
"ops-*" = "operator"
"reader-*" = "reader"
token = "reader"
admin = "admin"
'''


def sha256_ref(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def write_security_files(directory: Path, policy: str = POLICY) -> dict[str, str]:
    """The settings of a service with IDENTITIES' tokens and `policy`, files written in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = directory / "tokens.toml"
    tokens.write_text("[tokens]\n" + "".join(f'"{name}" = "{sha256_ref(token)}"\n'
                                             for name, (token, _) in IDENTITIES.items()))
    path = directory / "policy.toml"
    path.write_text(policy)
    return {"auth_tokens_file": str(tokens), "authz_policy_file": str(path), "auth_token": LEGACY_TOKEN}


def bearer(identity: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {IDENTITIES[identity][0]}"),)
