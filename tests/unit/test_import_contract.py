"""The import contract of the package (docs/design.md §9): a pure core, layers that depend inwards, no cycle.

- In a fresh interpreter, `import supervisor_service.core` (and each core
  module alone) loads no module of grpc, protobuf, pydantic,
  pydantic-settings, prometheus_client or aetcd, nor any module of the
  package outside the core; `import supervisor_service` alone loads none of
  them either, and neither do the core names of its lazy public API.
- The import graph of every module of the package, read from the source,
  has no cycle. Every import counts: at module level, inside a function (a
  lazy import), under `if TYPE_CHECKING:`. `from pkg import name`, with
  `pkg` a package, is an edge to `pkg/__init__`, and also to `pkg.name` when
  that is a submodule. A package's `__init__` re-exporting its own
  submodules is no cycle by itself; a module importing from the `__init__`
  of its own package (or of a package above it) is one: that `__init__` is
  still being run when it imports the module. Inside a package, modules
  import from modules.
- The layers import only what the table below allows, and the heavy
  dependencies stay where the table puts them.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "supervisor_service"
SOURCE = ROOT / PACKAGE

# What importing the core must not load: the wire, the settings, the metrics, etcd.
FORBIDDEN_IN_CORE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "pydantic", "pydantic_core",
                     "pydantic_settings", "prometheus_client", "aetcd", "psycopg")

# ---------------------------------------------------------------- the layers
#
# Units: the packages of the layout (core, runtime, store, cluster, remotes, edge, app, cli,
# evaluate, bench) and the top-level modules (proto, client); `root` is supervisor_service/__init__
# (the lazy public API), `_proto` the generated code.
#
# Two modules of app are units of their own, `metrics` and `settings`: the wiring (app) builds them
# and hands them down, so the layers below may name their types. Both are leaves: `metrics` imports
# only the core, `settings` the core and the store (endpoint parsing); neither imports what it is
# handed to. The store takes its Metrics only under TYPE_CHECKING: the writer is given one, importing
# the store loads no prometheus_client. The core names nothing of metrics, not even for types (what
# it needs of them it declares itself).

ALLOWED: dict[str, set[str]] = {
    "core": set(),  # the standard library and numpy only (test_core_imports_only_the_standard_library_and_numpy)
    "_proto": set(),
    "proto": {"_proto"},  # the only importer of the generated code
    # certificates, TLS credentials, identities, roles, the audit trail's pure parts: what every layer that
    # connects or checks a caller uses
    "security": {"core"},
    "client": {"core", "proto", "security"},
    "detector": {"core"},  # the reference detector at the contract's import path
    "store": {"core", "security"},
    "remotes": {"core", "proto", "security"},
    "cluster": {"core", "store", "metrics", "security"},
    "metrics": {"core"},
    "settings": {"core", "store", "security"},
    "runtime": {"core", "store", "remotes", "cluster", "metrics"},
    "edge": {"core", "proto", "store", "remotes", "cluster", "runtime", "metrics", "settings", "security"},
    "app": {"core", "proto", "store", "remotes", "cluster", "runtime", "edge", "metrics", "settings", "security"},
    "evaluate": {"core", "store", "remotes", "runtime", "metrics", "settings"},
    "cli": {"core", "proto", "client", "store", "app", "metrics", "settings", "evaluate", "security"},
    "bench": {"core", "proto", "client", "store", "remotes", "cluster", "runtime", "edge", "app", "metrics",
              "settings", "security"},
    "root": {"core", "client", "app", "settings", "cli"},
}
TYPE_ONLY: dict[str, set[str]] = {"store": {"metrics"}}

# The store's backends: the edge and the runtime are handed a StateStore, they never open or name a
# backend (that is the wiring's job).
BACKEND_MODULES = {f"{PACKAGE}.store.kv", f"{PACKAGE}.store.sqlite", f"{PACKAGE}.store.etcd", f"{PACKAGE}.store.open",
                   f"{PACKAGE}.store.postgres"}
BACKEND_NAMES = {"KV", "MemoryKV", "SqliteKV", "EtcdKV", "PostgresKV", "open_kv"}
NO_BACKEND = {"edge", "runtime"}

# Where each heavy dependency may be imported (numpy and the standard library: anywhere).
THIRD_PARTY: dict[str, set[str]] = {
    "grpc": {"_proto", "proto", "client", "remotes", "edge", "cli", "bench", "security"},
    "grpc_health": {"edge", "bench", "cli"},  # cli: `supervisor-service health`, a probe's client
    "grpc_reflection": {"edge"},
    "google.protobuf": {"_proto", "proto", "client", "remotes", "edge", "cli", "bench"},
    "pydantic": {"settings"},
    "pydantic_settings": {"settings"},
    "prometheus_client": {"metrics", "app", "cli", "evaluate", "bench"},
    "aetcd": {"store", "cluster"},
    "psycopg": {"store", "cluster"},
}


# ---------------------------------------------------------------- the graph, from the source


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a module of the package, or a third-party module)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    names: tuple[str, ...] = ()  # for `from target import names`

    def where(self) -> str:
        return f"{path_of(self.source).relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def discover() -> dict[str, Path]:
    """Every module of the package, generated code included (it is a node like any other)."""
    return {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


MODULES = discover()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def path_of(module: str) -> Path:
    return MODULES[module]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under `node`, with whether it is inside an `if TYPE_CHECKING:` body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, type_only
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_only
                yield from _walk(stmt, type_only)
            continue
        yield child, type_only
        yield from _walk(child, type_only)


def _resolve_relative(module: str, level: int, name: str | None) -> str:
    package = module if module in PACKAGES else module.rpartition(".")[0]
    base = package.split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str) -> list[Import]:
    """What `module` imports, read from its source: every import statement wherever it is, and
    `importlib.import_module("literal")`."""
    tree = ast.parse(path_of(module).read_text(), filename=str(path_of(module)))
    found: list[Import] = []
    for node, type_only in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, type_only))
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, node.level, node.module) if node.level else node.module) or ""
            names = tuple(alias.name for alias in node.names)
            found.append(Import(module, target, node.lineno, type_only, names))
            if target in PACKAGES:
                for name in names:
                    if f"{target}.{name}" in MODULES:
                        found.append(Import(module, f"{target}.{name}", node.lineno, type_only))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append(Import(module, node.args[0].value, node.lineno, type_only))
    return found


IMPORTS = {module: imports_of(module) for module in MODULES}


def internal(imp: Import) -> bool:
    return imp.target == PACKAGE or imp.target.startswith(PACKAGE + ".")


def graph() -> dict[str, list[Import]]:
    """module -> its imports of other modules of the package (a module not found is not a node)."""
    return {m: [i for i in imps if internal(i) and i.target in MODULES and i.target != m] for m, imps in IMPORTS.items()}


def unit_of(module: str) -> str:
    if module == PACKAGE:
        return "root"
    parts = module.split(".")
    if parts[1] == "app" and len(parts) > 2 and parts[2] in ("metrics", "settings"):
        return parts[2]
    return parts[1]


# ---------------------------------------------------------------- the core loads nothing heavy


CORE_MODULES = sorted(m for m in MODULES if m == f"{PACKAGE}.core" or m.startswith(f"{PACKAGE}.core."))

_PROBE = """
import json, sys
before = set(sys.modules)
exec(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by(statement: str) -> list[str]:
    """The modules a fresh interpreter loads to run `statement`."""
    done = subprocess.run([sys.executable, "-c", _PROBE, statement], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def heavy(modules: list[str]) -> list[str]:
    """The forbidden distributions among `modules` (by name: 'grpc', 'pydantic', ...)."""
    return sorted({f for m in modules for f in FORBIDDEN_IN_CORE if m == f or m.startswith(f + ".")})


@pytest.mark.parametrize("module", CORE_MODULES)
def test_importing_the_core_loads_no_grpc_protobuf_pydantic_prometheus_or_etcd(module):
    loaded = loaded_by(f"import {module}")
    assert heavy(loaded) == [], f"import {module} loads {heavy(loaded)}"
    outside = [m for m in loaded if m.startswith(PACKAGE + ".") and m not in CORE_MODULES]
    assert outside == [], f"import {module} loads modules of the package outside the core: {outside}"


def test_importing_the_package_alone_loads_nothing_heavy():
    loaded = loaded_by(f"import {PACKAGE}")
    assert heavy(loaded) == [], f"import {PACKAGE} loads {heavy(loaded)}"


def test_the_core_names_of_the_public_api_load_nothing_heavy():
    loaded = loaded_by(f"from {PACKAGE} import DetectorTable, PhiAccrualFailureDetector, PhiAccrualOptions, Supervisor")
    assert heavy(loaded) == [], f"the core names of the public API load {heavy(loaded)}"


# ---------------------------------------------------------------- no cycle


def _components(edges: dict[str, list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for imp in edges[v]:
            w = imp.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(edges: dict[str, list[Import]], start: str, members: set[str]) -> list[Import]:
    """The shortest way from `start` back to itself within `members` (breadth first), as its edges."""
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for imp in edges[v]:
                if imp.target == start:
                    return paths[v] + [imp]
                if imp.target in members and imp.target not in paths:
                    paths[imp.target] = paths[v] + [imp]
                    nxt.append(imp.target)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def _cycles(edges: dict[str, list[Import]]) -> list[list[Import]]:
    """For every module on a cycle, the shortest cycle through it (each cycle once)."""
    cycles, seen = [], set()
    for component in _components(edges):
        for module in component:
            cycle = _shortest_cycle(edges, module, set(component))
            key = frozenset((i.source, i.target) for i in cycle)
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _show(cycle: list[Import]) -> str:
    steps = " -> ".join([cycle[0].source] + [i.target for i in cycle])
    lines = ", ".join(f"{i.where()}{' (TYPE_CHECKING)' if i.type_only else ''}" for i in cycle)
    return f"{steps}   [{lines}]"


def test_no_import_cycle_among_the_modules_of_the_package():
    edges = graph()
    problems = [_show(c) for c in _cycles(edges)]
    # A module that imports from the __init__ of its own package, or of one above it: that __init__ is
    # being run (it is the parent) when the module is imported; a cycle even if the __init__ does not
    # import the module yet.
    for module, imps in sorted(edges.items()):
        if unit_of(module) == "_proto":
            continue  # generated by protoc (`make proto`): its packages' __init__ files are empty
        for imp in imps:
            if imp.target in PACKAGES and module.startswith(imp.target + "."):
                problems.append(f"{module} -> {imp.target} (the __init__ of its own package)   [{imp.where()}]")
    assert not problems, "import cycles:\n" + "\n".join(problems)


# ---------------------------------------------------------------- layering


def test_every_module_belongs_to_a_unit_of_the_layering_table():
    unknown = sorted({unit_of(m) for m in MODULES} - set(ALLOWED))
    assert not unknown, f"units missing from the layering table: {unknown}"


def test_the_layers_import_only_what_the_table_allows():
    problems = []
    for module, imps in sorted(graph().items()):
        unit = unit_of(module)
        for imp in imps:
            other = unit_of(imp.target)
            if other == unit or other in ALLOWED[unit]:
                continue
            if imp.type_only and other in TYPE_ONLY.get(unit, set()):
                continue
            how = " under TYPE_CHECKING" if imp.type_only else (
                " (allowed under TYPE_CHECKING only)" if other in TYPE_ONLY.get(unit, set()) else "")
            problems.append(f"{unit} -> {other}: {module} imports {imp.target}{how}   [{imp.where()}]")
    assert not problems, "imports the layering does not allow:\n" + "\n".join(problems)


def test_the_edge_and_the_runtime_name_no_store_backend():
    problems = []
    for module, imps in sorted(IMPORTS.items()):
        if unit_of(module) not in NO_BACKEND:
            continue
        for imp in imps:
            named = set(imp.names) & BACKEND_NAMES if imp.target == f"{PACKAGE}.store" else set()
            if imp.target in BACKEND_MODULES or named:
                problems.append(f"{module} imports {imp.target} {sorted(named) or ''}   [{imp.where()}]")
    assert not problems, "store backends named outside the wiring:\n" + "\n".join(problems)


def _top(name: str) -> str:
    return "google.protobuf" if name.startswith("google.protobuf") else name.partition(".")[0]


def test_core_imports_only_the_standard_library_and_numpy():
    problems = []
    for module in CORE_MODULES:
        for imp in IMPORTS[module]:
            if internal(imp) or _top(imp.target) in sys.stdlib_module_names or _top(imp.target) == "numpy":
                continue
            problems.append(f"{module} imports {imp.target}   [{imp.where()}]")
    assert not problems, "the core imports beyond the standard library and numpy:\n" + "\n".join(problems)


def test_the_heavy_dependencies_stay_where_the_table_puts_them():
    problems = []
    for module, imps in sorted(IMPORTS.items()):
        unit = unit_of(module)
        for imp in imps:
            top = _top(imp.target)
            if top in THIRD_PARTY and unit not in THIRD_PARTY[top]:
                problems.append(f"{unit}: {module} imports {imp.target}   [{imp.where()}]")
    assert not problems, "heavy dependencies outside their layers:\n" + "\n".join(problems)
