"""`python -m supervisor_service.bench --profile` (`make profile`): where the service's CPU goes under the flood.

The bench starts as usual (the service in this process, the fleet heartbeating
from the load-generator processes), then every fleet stream floods stamped
1,000-region heartbeats while py-spy (a dev dependency) records this process:
`py-spy record --format raw --threads --gil`, so each sample is the thread
holding the GIL: where the service's Python CPU goes (with `--profile-native`,
`--native` too: the C frames of grpc, protobuf and numpy under them). Printed:
the samples by thread, and the top functions by their own samples (self) and
by the samples they are on the stack of (total), the line numbers folded into
the function. The flood's row is printed too; py-spy pauses the process to
read each stack, so its numbers are a little worse than an unprofiled run's.
py-spy attaches with ptrace: as root it does; elsewhere it may need
CAP_SYS_PTRACE (`kernel.yama.ptrace_scope`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

from supervisor_service.bench.floods import Floods
from supervisor_service.bench.rows import render

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def _frame(text: str) -> str:
    """`func (path/to/module.py:123)` -> `func (to/module.py)`: the function, not the line."""
    text = _LINE.sub(")", text)
    name, _, where = text.partition(" (")
    if where:
        parts = where.rstrip(")").split("/")
        return f"{name} ({'/'.join(parts[-2:])})"
    return text


def parse_raw(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy's raw (collapsed) output with `--threads`: (thread, frames root first, samples) per line."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            thread = thread.partition(": ")[2] or thread
            frames = frames[1:]
        else:
            thread = "?"
        out.append((thread, [_frame(f) for f in frames], int(count)))
    return out


def summarize(samples: list[tuple[str, list[str], int]], top: int = 20) -> str:
    """Samples by thread, then the top functions by self and by total samples, as text."""
    total = sum(n for _, _, n in samples) or 1
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for thread, frames, n in samples:
        threads[thread] += n
        if frames:
            own[f"{frames[-1]}  [{thread}]"] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total:,} samples (the thread holding the GIL)", "", "by thread:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", f"top {top} by self samples (the function itself, not what it calls):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", f"top {top} by total samples (on the stack):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def profile_main(bench, seconds: float, native: bool = False) -> int:
    """Start the bench's service and fleet, flood for `seconds` under py-spy, print the summary; with
    `native`, C frames too (grpc's core, protobuf, numpy, the kernel calls), at fewer samples a second."""
    exe = py_spy()
    if exe is None:
        print("py-spy is not installed (it is a dev dependency: `make venv`)", file=sys.stderr)
        return 2
    cfg = bench.cfg
    raw = os.path.join(tempfile.mkdtemp(prefix="bench-profile-"), "py-spy.raw.txt")
    try:
        bench.start()
        time.sleep(min(5.0, 2 * cfg.period_s))  # past the fleet's first heartbeats
        bench.log(f"py-spy record of this process ({os.getpid()}) for {seconds:.0f} s, under the stamped flood")
        spy = subprocess.Popen(
            [exe, "record", "--pid", str(os.getpid()), "--duration", str(max(1, round(seconds))), "--rate", "100",
             "--format", "raw", "--threads", "--gil", "--output", raw, *(["--native"] if native else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        time.sleep(1.0)  # attached (py-spy reads the interpreter's state first)
        cfg.flood_s = seconds
        Floods(bench).big(True)
        spy_out, _ = spy.communicate(timeout=seconds + 60)
    finally:
        bench.stop()
    if spy.returncode != 0 or not os.path.exists(raw):
        print(f"py-spy could not record this process (exit {spy.returncode}):\n{spy_out}", file=sys.stderr)
        return 1
    print(render(bench.rows))
    print()
    with open(raw) as f:
        print(summarize(parse_raw(f.read())))
    print()
    print(f"- raw py-spy samples (collapsed stacks, for a flame graph): {raw}")
    return 0
