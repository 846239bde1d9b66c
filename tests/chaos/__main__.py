"""`python -m tests.chaos` (`make chaos`): the seeded chaos suite; exits 1 on any violation.

CHAOS_SEED (default 1) and CHAOS_MINUTES (default 3: the whole run, of which about a minute is
bring-up, healing and checks) set the defaults of --seed and --minutes; --seeds 1,2,3 runs several.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from tests.chaos.nemesis import KIND_NAMES
from tests.chaos.report import render
from tests.chaos.run import run_chaos

OVERHEAD_S = 60.0  # bring-up, healing, the waits for failovers and the settle time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=os.environ.get("CHAOS_SEED", "1"), help="CHAOS_SEED (default 1)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds, run one after the other")
    parser.add_argument("--minutes", type=float, default=os.environ.get("CHAOS_MINUTES", "3"),
                        help="CHAOS_MINUTES (default 3): the whole run of one seed, at least 1.2")
    parser.add_argument("--datanodes", type=int, default=os.environ.get("CHAOS_DATANODES", "24"),
                        help="simulated datanodes, 6 to 200 (default 24)")
    parser.add_argument("--deaths", type=int, default=None, help="datanodes that really die (default: by length)")
    parser.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all): " +
                        ", ".join(KIND_NAMES))
    parser.add_argument("--work-dir", default="", help="where logs and history.json go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SUPERVISOR_X=VALUE",
                        help="a setting of every replica (to show the checker failing a weakened service)")
    parser.add_argument("--scenario", choices=("cluster", "disk", "all"), default="all",
                        help="cluster: the etcd cluster run; disk: the SQLite disk-fault run")
    args = parser.parse_args(argv)
    if not 1.2 <= args.minutes <= 24 * 60:
        parser.error(f"--minutes (CHAOS_MINUTES) must be between 1.2 and 1440, not {args.minutes}")
    if not 6 <= args.datanodes <= 200:
        parser.error(f"--datanodes must be between 6 and 200, not {args.datanodes}")
    if args.deaths is not None and not 0 <= args.deaths <= args.datanodes // 3:
        parser.error(f"--deaths must be between 0 and a third of the datanodes ({args.datanodes // 3}): more "
                     "silent together is a mass failure, which the service rightly holds")
    if args.scenario != "disk":
        for binary, package in (("etcd", "etcd-server"), ("gcc", "gcc")):
            if shutil.which(binary) is None:
                parser.error(f"{binary} not found: install the Debian package {package} (`make chaos` does it as root)")
    kinds = tuple(k for k in args.kinds.split(",") if k) or KIND_NAMES
    unknown = [k for k in kinds if k not in KIND_NAMES]
    if unknown:
        parser.error(f"unknown fault kinds: {unknown}")
    if any("=" not in item or not item.startswith("SUPERVISOR_") for item in args.set):
        parser.error("--set takes SUPERVISOR_NAME=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.set)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [args.seed]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    seconds = max(10.0, args.minutes * 60 - OVERHEAD_S)
    failed = False
    for seed in seeds:
        if args.scenario in ("cluster", "all"):
            work = os.path.join(args.work_dir, f"seed-{seed}") if args.work_dir else None
            result = run_chaos(seed=seed, seconds=seconds, datanodes=args.datanodes, deaths_count=args.deaths,
                               kinds=kinds, work_dir=work, extra_env=extra_env)
            print(render(seed, result.faults, result.history, result.violations, result.numbers,
                         result.nemesis_errors))
            print(f"history and logs: {result.work_dir}")
            failed = failed or bool(result.violations)
        if args.scenario in ("disk", "all"):
            from tests.chaos.disk import run_disk

            disk = run_disk(seed=seed, work_dir=os.path.join(args.work_dir, f"disk-{seed}") if args.work_dir else None)
            print(disk.report())
            failed = failed or bool(disk.violations)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
