"""Peak memory and time of comparing every tensor: `aligner compare` vs Polygraphy.

    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50.onnx
    python benchmarks/compare_memory.py benchmarks/work/detr_r50.onnx --repeat 3

Each command runs as a child process; peak RSS is the largest sum of RSS over the process tree,
sampled every 20 ms; CPU s is the user + system time of the child and its descendants. aligner runs
the model twice (reference ORT FP32 with optimizations off, target ORT FP32 with optimizations on)
and diffs every tensor — cut into segments that each run once (default), and, for comparison, in
whole-model groups (``--whole-model-groups``, the earlier way).

Polygraphy doing the same work (two ORT configurations, every tensor marked, every output compared):

* through its API (``benchmarks/polygraphy_two_ort.py``): two ONNX Runtime runners, optimizations
  off and on, in one ``Comparator.run``, then ``Comparator.compare_accuracy`` (its default rule);
* through its CLI, which has one ``--graph-optimization-level`` for every ONNX Runtime runner, so two
  commands: the reference with ``ORT_DISABLE_ALL --save-outputs DIR`` (a directory: streamed, as its
  help advises), then the target with ``--load-outputs DIR``, which compares. Wall and CPU time are
  the two commands' sum, peak RSS the larger of the two.

The first Polygraphy row (one runtime, nothing compared) is kept from the earlier measurements.
Same model, same inputs (npz for aligner, the same values as Polygraphy JSON), rows interleaved in
each round; medians over the rounds.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _work import work_dir

HERE = Path(__file__).resolve().parent


def measure(cmd: list[str]) -> tuple[float, float, float, int]:
    """(wall s, peak RSS GiB of the process tree, CPU s of the tree, exit code) of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 2**30, cpu, proc.returncode


def measure_steps(steps: list[list[str]], before=None) -> tuple[float, float, float, int]:
    """Commands run one after the other as one row: wall and CPU summed, the larger peak, the last exit code."""
    if before is not None:
        before()
    runs = [measure(cmd) for cmd in steps]
    return sum(r[0] for r in runs), max(r[1] for r in runs), sum(r[2] for r in runs), runs[-1][3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model = Path(args.model)
    npz = model.with_suffix(".inputs.npz")
    work = work_dir("compare-memory-")
    pg_inputs = work / "inputs.json"
    from aligner.inputs import load_inputs, save_inputs

    save_inputs(load_inputs(npz), pg_inputs, force=True)
    out, saved = work / "aligner_diff.json", work / "polygraphy_reference"
    aligner = ["aligner", "compare", str(model), "--target", "ort:cpu:fp32", "--inputs", str(npz), "--json", str(out), "--force"]
    polygraphy = ["polygraphy", "run", str(model), "--onnxrt", "--onnx-outputs", "mark", "all", "--load-inputs", str(pg_inputs)]
    rows = {
        "aligner compare (ref + target, every tensor; segments)": ([aligner], None),
        "aligner compare --whole-model-groups (before)": ([aligner + ["--whole-model-groups"]], None),
        "polygraphy run --onnxrt --onnx-outputs mark all (one runtime, nothing compared)": ([polygraphy], None),
        "Polygraphy API: two ORT runners (opt off / on), mark all, compare_accuracy": (
            [[sys.executable, str(HERE / "polygraphy_two_ort.py"), str(model), str(pg_inputs)]], None),
        "polygraphy run CLI: ORT_DISABLE_ALL --save-outputs, then --load-outputs (compares)": (
            [polygraphy + ["--graph-optimization-level", "ORT_DISABLE_ALL", "--save-outputs", str(saved)],
             polygraphy + ["--load-outputs", str(saved)]],
            lambda: shutil.rmtree(saved, ignore_errors=True)),
    }
    results = {name: [] for name in rows}
    for round_ in range(args.repeat):
        for name, (steps, before) in rows.items():
            results[name].append(measure_steps(steps, before))
            wall, peak, cpu, rc = results[name][-1]
            print(f"round {round_ + 1}: {name}: {wall:.1f} s, {peak:.2f} GiB, {cpu:.1f} CPU s, exit {rc}", file=sys.stderr, flush=True)
    shutil.rmtree(saved, ignore_errors=True)
    med = {name: tuple(statistics.median(r[i] for r in runs) for i in range(3)) for name, runs in results.items()}
    print("| command | median wall s | median peak RSS GiB | median CPU s | exit code | runs |")
    print("|---|---|---|---|---|---|")
    for name, (wall, peak, cpu) in med.items():
        print(f"| {name} | {wall:.1f} | {peak:.2f} | {cpu:.1f} | {results[name][0][3]} | {len(results[name])} |")
    (a_t, a_m, a_c), *_ = med.values()
    print()
    for name, (t, m, c) in list(med.items())[1:]:
        print(f"aligner (segments) / {name}: time {a_t / t:.2f}x, peak RSS {a_m / m:.2f}x, CPU {a_c / c:.2f}x")


if __name__ == "__main__":
    main()
