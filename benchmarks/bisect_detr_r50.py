"""Bisect DETR-R50 with one injected fault: aligner's strategies vs Polygraphy, in one run.

    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50_512.onnx 512
    python benchmarks/bisect_detr_r50.py benchmarks/work/detr_r50_512.onnx

The fault is the seed's DETR bug: one Gather's constant index changed (the model still runs, same
output shapes, wrong numbers). Each command runs as a child process; wall time and peak RSS of its
process tree are measured (sampled every 20 ms). Rows:

* ``aligner bisect --strategy S --target-model faulty.onnx`` for S in all, frontier, isolate, auto:
  target runs (from its JSON), whether it named the edited Gather;
* ``polygraphy run --onnxrt --onnx-outputs mark all`` on the original (the golden layer-wise
  outputs Polygraphy's reduce workflow needs; also its "capture everything" cost);
* ``polygraphy debug reduce faulty.onnx --mode bisect`` with the documented check
  (``polygraphy run polygraphy_debug.onnx --onnxrt --load-inputs layerwise_inputs.json
  --load-outputs golden.json``): the number of checks it ran (each a model run) and the size of
  the reduced model it ends with. Polygraphy runs in the work folder under ``benchmarks/work/``,
  where it writes ``polygraphy_debug.onnx`` and its ``polygraphy_debug_replay*.json`` files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import psutil
from _work import work_dir


def measure(cmd: list[str], ok=(0, 1), cwd: Path | None = None) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    if proc.returncode not in ok:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-3000:]}")
    return time.perf_counter() - start, peak / 2**30


def count_check(counter: str, cmd: list[str]) -> int:
    """``--count-check FILE CMD...``: run Polygraphy's check command, counting each call."""
    with open(counter, "a") as f:
        f.write("1\n")
    return subprocess.call(cmd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    args = ap.parse_args()
    from aligner.examples.faults import change_gather_index

    from aligner.inputs import load_inputs, save_inputs

    model = Path(args.model).resolve()
    work = work_dir("bisect-detr-")
    faulty, victim = change_gather_index(model, work)
    npz = model.with_suffix(".inputs.npz")
    inputs_json = work / "inputs.json"
    save_inputs(load_inputs(npz), inputs_json, force=True)
    print(f"model {model.name}: {sum(1 for n in onnx.load(str(model), load_external_data=False).graph.node)} nodes; "
          f"fault: Gather {victim!r} index edited")

    rows = []
    for strategy in ("all", "frontier", "isolate", "auto"):
        out = work / f"verdict_{strategy}.json"
        wall, peak = measure(["aligner", "bisect", str(model), "--target-model", str(faulty), "--inputs", str(npz),
                              "--strategy", strategy, "--json", str(out), "--force"])
        doc = json.loads(out.read_text())
        named = doc["root_cause"] and doc["root_cause"]["node"] == victim
        rows.append((f"aligner bisect --strategy {strategy}", doc["target_runs"], wall, peak,
                     f"root cause {doc['root_cause']['kind'] if doc['root_cause'] else None}: {'the edited Gather' if named else 'WRONG'}"))

    golden = work / "golden.json"
    wall, peak = measure(["polygraphy", "run", str(model), "--onnxrt", "--onnx-outputs", "mark", "all",
                          "--load-inputs", str(inputs_json), "--save-outputs", str(golden)])
    rows.append(("polygraphy run --onnxrt --onnx-outputs mark all", 1, wall, peak, "golden layer-wise outputs for reduce"))
    layerwise_inputs = work / "layerwise_inputs.json"
    subprocess.check_call(["polygraphy", "data", "merge", str(inputs_json), str(golden), "-o", str(layerwise_inputs)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counter = work / "checks.txt"
    reduced = work / "reduced.onnx"
    check = [sys.executable, str(Path(__file__).resolve()), "--count-check", str(counter), "polygraphy", "run", "polygraphy_debug.onnx",
             "--onnxrt", "--load-inputs", str(layerwise_inputs), "--load-outputs", str(golden)]
    wall, peak = measure(["polygraphy", "debug", "reduce", str(faulty), "-o", str(reduced), "--mode", "bisect",
                          "--load-inputs", str(layerwise_inputs), "--check", *check], ok=(0,), cwd=work)
    checks = len(counter.read_text().splitlines()) if counter.exists() else 0
    reduced_nodes = [n for n in onnx.load(str(reduced), load_external_data=False).graph.node] if reduced.exists() else []
    has_victim = any(n.name == victim for n in reduced_nodes)
    rows.append(("polygraphy debug reduce --mode bisect", checks, wall, peak,
                 f"reduced model: {len(reduced_nodes)} nodes, {'contains' if has_victim else 'lacks'} the edited Gather"))

    print("| command | target runs / checks | wall s | peak RSS GiB | verdict |")
    print("|---|---|---|---|---|")
    for name, runs, wall, peak, verdict in rows:
        print(f"| {name} | {runs} | {wall:.1f} | {peak:.2f} | {verdict} |")
    print(f"\n(work files in {work}; delete when done)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--count-check":
        sys.exit(count_check(sys.argv[2], sys.argv[3:]))
    main()
