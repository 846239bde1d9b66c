"""Roles: which RPC needs which role, the policy file that gives identities their roles, and the rule
that a `datanode-<N>` identity heartbeats as datanode N only (docs/design.md §14.3).

Pure: no grpc, no clock, no I/O but `load_policy` reading the file it is given.

The role an RPC needs comes from its name, so that an RPC added to the service falls in place:
`Get*`, `List*`, `Dump`, `Explain`, `WhatIf` are `reader` calls; the others are named in
`_EXPLICIT`. An RPC that neither names is `admin` only (fail closed), and a test fails for it.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROLES = ("datanode", "metasrv", "operator", "reader", "admin")
"""Every role of the policy file (DESIGN.md section 8)."""

OPEN = "open"
"""What `required_role` says of grpc.health.v1: anyone, authenticated or not, may call it."""

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

# The roles that may call what a role may: `reader` calls are open to metasrv and operator too.
_INCLUDES = {
    "datanode": frozenset({"datanode"}),
    "reader": frozenset({"reader"}),
    "metasrv": frozenset({"metasrv", "reader"}),
    "operator": frozenset({"operator", "reader"}),
}

# RegionSupervisor RPCs whose role the name rule does not give.
_EXPLICIT = {
    "SendHeartbeat": "datanode",
    "RegisterDetectors": "metasrv",
    "DeregisterDetectors": "metasrv",
    "ResetDetectors": "metasrv",
    "SetMaintenanceMode": "operator",
    "ReleaseFailoverHold": "operator",
    # The planned operations (DESIGN.md section 10).
    "DrainDatanodes": "operator",
    "CancelDrain": "operator",
    "SetTablePolicy": "operator",
}
_READER_NAMES = ("Dump", "Explain", "WhatIf")
_READER_PREFIXES = ("Get", "List")

# A glob of identities: DNS-name characters, `*`, `?` and `[...]` classes. Anything else (a space, a
# quote, an unclosed class) is a mistake in the file, not an identity.
_GLOB = re.compile(r"(?:[A-Za-z0-9._@:*?-]|\[!?[A-Za-z0-9._@:-]+\])+")
_DATANODE_LABEL = re.compile(r"datanode-([0-9]{1,20})", re.IGNORECASE)
MAX_RULES = 1000
_UINT64_MAX = 2**64 - 1


class PolicyError(ValueError):
    """A policy or tokens file that cannot be used; the message is one line naming the file and the entry."""


def required_role(service: str, method: str) -> str | None:
    """The role `service`/`method` needs: a role of ROLES, OPEN (health), or None for an RPC no rule
    names (then only `admin` may call it)."""
    if service == HEALTH_SERVICE:
        return OPEN
    if service in REFLECTION_SERVICES:
        return "reader"
    if method in _EXPLICIT:
        return _EXPLICIT[method]
    if method in _READER_NAMES or method.startswith(_READER_PREFIXES):
        return "reader"
    return None


def may_call(role: str | None, needed: str | None) -> bool:
    """A caller of `role` (None: no rule of the policy matched it) may call an RPC that needs `needed`."""
    if needed == OPEN:
        return True
    if role == "admin":
        return True
    if role is None or needed is None:
        return False
    return needed in _INCLUDES.get(role, frozenset())


def datanode_of(identity: str) -> int | None:
    """N when the identity's first DNS label is `datanode-<N>` (N a uint64), else None."""
    match = _DATANODE_LABEL.fullmatch(identity.split(".", 1)[0])
    if match is None:
        return None
    n = int(match.group(1))
    return n if n <= _UINT64_MAX else None


@dataclass(frozen=True, slots=True)
class Policy:
    """Identity globs and their roles, first match wins; `bind_datanode_ids` keeps a `datanode-<N>`
    identity to heartbeats of datanode N."""

    rules: tuple[tuple[str, str], ...]
    bind_datanode_ids: bool = True
    source: str = ""

    def role_of(self, identity: str) -> str | None:
        for glob, role in self.rules:
            if fnmatch.fnmatchcase(identity, glob):
                return role
        return None


OPEN_POLICY = Policy(rules=(("*", "admin"),), source="(no policy file: any authenticated caller may call anything)")
"""No policy file: any authenticated caller may call anything (datanode ids stay bound)."""


def parse_policy(text: str, source: str) -> Policy:
    """The policy of a TOML text: `bind_datanode_ids = true|false` and `[roles]` `"glob" = "role"`."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {source}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"roles", "bind_datanode_ids"})
    if unknown:
        raise PolicyError(f"policy file {source}: unknown key {unknown[0]!r} (expected [roles] and bind_datanode_ids)")
    bind = doc.get("bind_datanode_ids", True)
    if not isinstance(bind, bool):
        raise PolicyError(f"policy file {source}: bind_datanode_ids must be true or false, got {bind!r}")
    roles = doc.get("roles")
    if not isinstance(roles, dict) or not roles:
        raise PolicyError(f"policy file {source}: no [roles] table (e.g. [roles] \"datanode-*\" = \"datanode\")")
    if len(roles) > MAX_RULES:
        raise PolicyError(f"policy file {source}: {len(roles)} entries in [roles], at most {MAX_RULES}")
    rules = []
    for glob, role in roles.items():  # tomllib keeps the file's order: first match wins
        if isinstance(role, dict):
            raise PolicyError(f"policy file {source}: entry {glob!r} is a table; quote a glob with dots "
                              f"(\"{glob}.*\" = \"reader\")")
        if len(glob) > 253 or not _GLOB.fullmatch(glob):
            raise PolicyError(f"policy file {source}: entry {glob!r}: not a valid identity glob "
                              "(DNS-name characters, *, ? and [...] classes)")
        if role not in ROLES:
            raise PolicyError(f"policy file {source}: entry {glob!r}: unknown role {role!r} "
                              f"(one of {', '.join(ROLES)})")
        rules.append((glob, role))
    return Policy(tuple(rules), bind, source)


def read_security_file(path: str | Path, kind: str) -> str:
    """The text of a policy or tokens file; PolicyError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{kind} file {path}: cannot be read: {exc}") from None


def load_policy(path: str | Path) -> Policy:
    """`parse_policy` of the file at `path`."""
    return parse_policy(read_security_file(path, "policy"), str(path))
