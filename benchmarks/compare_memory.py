"""Peak memory and time of capturing every tensor: `aligner compare` vs Polygraphy `mark all`.

    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50.onnx
    python benchmarks/compare_memory.py benchmarks/work/detr_r50.onnx --repeat 3

Each command runs as a child process; peak RSS is the largest sum of RSS over the process tree,
sampled every 20 ms. aligner runs the model twice (reference ORT FP32 with optimizations off,
target ORT FP32 with optimizations on) and diffs every tensor — cut into segments that each run
once (default), and, for comparison, in whole-model groups (``--whole-model-groups``, the earlier way); Polygraphy runs it once and holds
every output. Same model, same inputs, commands interleaved in one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _work import work_dir


def measure(cmd: list[str]) -> tuple[float, float, int]:
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
    if proc.returncode not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 2**30, proc.returncode


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
    out = work / "aligner_diff.json"
    commands = {
        "aligner compare (ref + target, every tensor; segments)": ["aligner", "compare", str(model), "--target", "ort:cpu:fp32", "--inputs", str(npz), "--json", str(out), "--force"],
        "aligner compare --whole-model-groups (before)": ["aligner", "compare", str(model), "--target", "ort:cpu:fp32", "--inputs", str(npz), "--json", str(out),
                                                          "--force", "--whole-model-groups"],
        "polygraphy run --onnxrt --onnx-outputs mark all": ["polygraphy", "run", str(model), "--onnxrt", "--onnx-outputs", "mark", "all", "--load-inputs", str(pg_inputs)],
    }
    results = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            results[name].append(measure(cmd))
    print("| command | median wall s | median peak RSS GiB | runs |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.1f} | {statistics.median(r[1] for r in rows):.2f} | {len(rows)} |")
    med = {name: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)) for name, rows in results.items()}
    (a_t, a_m), (b_t, b_m), (p_t, p_m) = med.values()
    print(f"\naligner (segments) / polygraphy: time {a_t / p_t:.2f}x, peak RSS {a_m / p_m:.2f}x; "
          f"before (whole-model groups) / polygraphy: time {b_t / p_t:.2f}x, peak RSS {b_m / p_m:.2f}x")


if __name__ == "__main__":
    main()
