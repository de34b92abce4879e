"""Wall time of ``aligner demo``, each run in a fresh process and a fresh folder, on this checkout
and (``--other DIR``, e.g. an earlier commit unpacked with ``git archive REV | tar -x -C DIR``) on
another, interleaved run by run so both see the same machine load. Prints one row per run (wall
seconds, and the CPU seconds the run used, user + system, which load from other work inflates far
less than the wall time), the medians, their ratios and the load average.

    python benchmarks/demo_time.py --rounds 3
    python benchmarks/demo_time.py --rounds 3 --other /tmp/old   # before/after, side by side
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def time_demo(tree: Path, out: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status) of one ``aligner demo``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aligner.cli.main", "demo", "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other", type=Path, help="another checkout to time beside this one")
    args = parser.parse_args()
    trees = {"this": HERE} | ({"other": args.other.resolve()} if args.other else {})
    walls: dict[str, list[float]] = {name: [] for name in trees}
    cpus: dict[str, list[float]] = {name: [] for name in trees}
    print(f"{'round':>5} {'tree':<6} {'wall s':>7} {'CPU s':>7} {'exit':>4} {'load1':>6}")
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        for r in range(args.rounds):
            for name, tree in trees.items():
                wall, cpu, code = time_demo(tree, Path(tmp) / f"{name}-{r}")
                walls[name].append(wall)
                cpus[name].append(cpu)
                print(f"{r + 1:>5} {name:<6} {wall:>7.1f} {cpu:>7.1f} {code:>4} {os.getloadavg()[0]:>6.2f}", flush=True)
    for name in trees:
        print(f"median {name}: wall {statistics.median(walls[name]):.1f} s, CPU {statistics.median(cpus[name]):.1f} s")
    if "other" in trees:
        for what, values in (("wall", walls), ("CPU", cpus)):
            print(f"ratio this/other, {what}: {statistics.median(values['this']) / statistics.median(values['other']):.2f}")


if __name__ == "__main__":
    main()
