"""The report of a chaos run: the seed, the fault schedule, the numbers, and a table of faults x
invariants (how often each fault was injected, and the violations found while it was on or in the
10 s after it ended; "ok" when none)."""

from __future__ import annotations

from tests.chaos.history import INVARIANTS, History, Violation
from tests.chaos.nemesis import DATANODE_DEATH, KIND_NAMES, Fault

AFTERMATH_S = 10.0


def attribute(history: History, violations: list[Violation]) -> dict[tuple[str, str], int]:
    """(fault kind, invariant) -> violations that happened while a fault of that kind was on (or
    AFTERMATH_S after); ("none", invariant) for the rest."""
    cells: dict[tuple[str, str], int] = {}
    for v in violations:
        kinds = {f.kind for f in history.faults
                 if f.start <= v.at <= (f.end if f.end is not None else history.ended_at) + AFTERMATH_S}
        for kind in kinds or {"none"}:
            cells[(kind, v.invariant)] = cells.get((kind, v.invariant), 0) + 1
    return cells


def table(history: History, violations: list[Violation]) -> str:
    cells = attribute(history, violations)
    counts: dict[str, int] = {}
    for f in history.faults:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    short = [i.replace("_", " ") for i in INVARIANTS]
    width = max(len(s) for s in short)
    rows = [k for k in KIND_NAMES + (DATANODE_DEATH,) if k in counts] + ["none"]
    head = f"| {'fault':<28} | {'n':>3} | " + " | ".join(f"{s:<{width}}" for s in short) + " |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for kind in rows:
        n = counts.get(kind, 0)
        if kind == "none" and not any(k == "none" for k, _ in cells):
            continue
        marks = []
        for inv in INVARIANTS:
            bad = cells.get((kind, inv), 0)
            marks.append(f"{('VIOLATED x' + str(bad)) if bad else 'ok':<{width}}")
        lines.append(f"| {kind:<28} | {n:>3} | " + " | ".join(marks) + " |")
    total = {inv: sum(1 for v in violations if v.invariant == inv) for inv in INVARIANTS}
    lines.append(f"| {'ALL (whole run)':<28} | {sum(counts.values()):>3} | " + " | ".join(
        f"{('VIOLATED x' + str(total[inv])) if total[inv] else 'held':<{width}}" for inv in INVARIANTS) + " |")
    return "\n".join(lines)


def render(seed: int, faults: list[Fault], history: History, violations: list[Violation],
           numbers: dict[str, object], nemesis_errors: list[str]) -> str:
    out = [f"seed {seed}", "", "fault schedule (start, duration, kind, target choice, amount):"]
    out += ["  " + f.describe() for f in faults]
    out += ["", "faults as injected (start..end s: kind, target):"]
    out += [f"  {f.start:6.1f}..{(f.end if f.end is not None else float('nan')):6.1f}  {f.kind:<28} {f.target}"
            for f in history.faults]
    out += ["", "numbers:"] + [f"  {k}: {v}" for k, v in numbers.items()]
    if nemesis_errors:
        out += ["", "faults that could not be injected:"] + ["  " + e for e in nemesis_errors]
    out += ["", table(history, violations), ""]
    if violations:
        out.append(f"{len(violations)} VIOLATIONS (reproduce with CHAOS_SEED={seed}):")
        out += [f"  [{v.invariant}] at {v.at:.2f} s: {v.detail}" for v in violations]
    else:
        out.append(f"every invariant held (seed {seed})")
    return "\n".join(out)
