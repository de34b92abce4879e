"""Wall time of ``aligner demo``, each run in a fresh process and a fresh folder, on this checkout
and (``--other DIR``, e.g. an earlier commit unpacked with ``git archive REV | tar -x -C DIR``) on
another, interleaved run by run so both see the same machine load. Prints one row per run, the
medians, their ratio and the load average.

    python benchmarks/demo_time.py --rounds 3
    python benchmarks/demo_time.py --rounds 3 --other /tmp/old   # before/after, side by side
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def time_demo(tree: Path, out: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aligner.cli.main", "demo", "--out", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--other", type=Path, help="another checkout to time beside this one")
    args = parser.parse_args()
    trees = {"this": HERE} | ({"other": args.other.resolve()} if args.other else {})
    times: dict[str, list[float]] = {name: [] for name in trees}
    print(f"{'round':>5} {'tree':<6} {'seconds':>8} {'exit':>4} {'load1':>6}")
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        for r in range(args.rounds):
            for name, tree in trees.items():
                seconds, code = time_demo(tree, Path(tmp) / f"{name}-{r}")
                times[name].append(seconds)
                print(f"{r + 1:>5} {name:<6} {seconds:>8.1f} {code:>4} {os.getloadavg()[0]:>6.2f}", flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, m in medians.items():
        print(f"median {name}: {m:.1f} s")
    if "other" in medians:
        print(f"ratio this/other: {medians['this'] / medians['other']:.2f}")


if __name__ == "__main__":
    main()
