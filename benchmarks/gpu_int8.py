"""INT8 on the GPU machine (issue 17): ort:cuda:int8 and trt:int8 on the example detector.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH \
        python benchmarks/gpu_int8.py --out $OUT

Calibration as in int8_detector.py (32 images of a separate split, seed 4242); the plan is the
CPU search's AP plan in benchmarks/int8_detector.json (its float nodes and quantizer settings).

1. COCO AP on the 200 val images and latency (medians, batch 1 and 8, the targets timed side by
   side in interleaved rounds) of ort:cuda:fp32, ort:cuda:fp16 (cudnn HEURISTIC), ort:cuda:int8
   (full), ort:cuda:int8 + the plan, and the same with the plan's float nodes in FP16 (fallback=fp16).
2. What ONNX Runtime's CUDA provider runs for the QDQ model: the optimized graph's op types.
3. bisect --strategy isolate on ort:cuda:int8: the nodes with the largest own error.
4. The float-fallback search on ort:cuda:int8 itself, accepted on AP (drop <= 0.5 point).
5. trt:int8 (full, +plan, +plan with fallback=fp16) and trt:fp16 built by this TensorRT (TensorRT-RTX here: it builds, but does not
   execute on compute capability 9.0): success, seconds, engine bytes, or the error.

Prints a table per part and writes gpu_int8.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-trials", type=int, default=80)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--parts", default="accuracy_latency,cuda_kernels,isolate,trt_builds,search", help="comma-separated parts to run")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of the script on a machine without a GPU")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    report["_out"], report["_parts"] = str(out / "gpu_int8.json"), args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="gpu-int8-") as tmp:
        run(args, Path(tmp), report)


def _step(report: dict, name: str, fn) -> None:
    """Run one part; record its result or its error, and write the report so far (a later part may run out of time)."""
    if name not in report["_parts"]:
        return
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark records what failed and goes on
        report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-3000:]}
    print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    Path(report["_out"]).write_text(json.dumps(report, indent=1, default=str))


def run(args, work: Path, report: dict) -> None:
    from aligner.backends.target import Target
    from int8_detector import detector_and_calibration

    graph, dataset, pre, adapter, calib = detector_and_calibration(work)
    cpu = json.loads((ROOT / "benchmarks" / "int8_detector.json").read_text())["plan_ap"]
    settings = {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in cpu["settings"].items() if k != "percentile"}
    d = args.device
    int8 = Target.parse(f"ort:{d}:int8").with_options({"calib": str(calib), **settings})
    targets = {"fp32": Target.parse(f"ort:{d}:fp32"), "fp16": Target.parse("ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC" if d == "cuda" else "ort:cpu:fp16"),
               "int8": int8, "int8+plan": int8.with_pins(cpu["float_nodes"]),
               "int8+plan fp16": int8.with_pins(cpu["float_nodes"]).with_options({"fallback": "fp16"})}
    report["targets"] = {k: str(t) for k, t in targets.items()}
    _step(report, "accuracy_latency", lambda: accuracy_latency(graph, dataset, adapter, pre, targets))
    _step(report, "cuda_kernels", lambda: cuda_kernels(graph, int8))
    _step(report, "isolate", lambda: isolate(graph, int8, dataset, pre))
    plan = work / "plan.json"
    plan.write_text(json.dumps({"fp32_nodes": [{"node": n} for n in cpu["float_nodes"]], "accept": ["outputs finite"],
                                "quantization": {"settings": cpu["settings"]}}))
    _step(report, "trt_builds", lambda: trt_builds(graph, calib, plan, work))
    if not args.skip_search:  # last: the longest
        _step(report, "search", lambda: search(graph, int8, dataset, adapter, pre, args.max_trials))


def accuracy_latency(graph, dataset, adapter, pre, targets) -> dict:
    from aligner.backends import make_runner
    from aligner.eval.run import evaluate_detector

    result = evaluate_detector(graph, dataset, adapter, pre, [str(t) for t in targets.values()])
    rows = {name: {"AP": round(r.stats["AP"], 4), "AP50": round(r.stats["AP50"], 4)} for name, r in zip(targets, result.targets)}
    x1 = next(iter(dataset.batches(pre, 1)))[0]
    runners = {name: make_runner(graph, t) for name, t in targets.items()}
    for batch in (1, 8):
        feeds = {"pixels": np.repeat(x1, batch, axis=0)}
        times: dict[str, list[float]] = {n: [] for n in runners}
        for r in runners.values():
            r.time(feeds, runs=5, warmup=20)
        for _ in range(5):  # interleaved rounds
            for name, r in runners.items():
                times[name] += r.time(feeds, runs=40, warmup=2)
        for name in runners:
            rows[name][f"b{batch}_ms"] = round(statistics.median(times[name]), 3)
    for name in rows:
        for b in (1, 8):
            rows[name][f"b{b}_speed_vs_fp32"] = round(rows["fp32"][f"b{b}_ms"] / rows[name][f"b{b}_ms"], 2)
    print(f"{'target':<15} {'AP':>7} {'AP50':>7} {'b1 ms':>8} {'b8 ms':>8} {'b1 x':>6} {'b8 x':>6}")
    for name, r in rows.items():
        print(f"{name:<15} {r['AP']:7.4f} {r['AP50']:7.4f} {r['b1_ms']:8.3f} {r['b8_ms']:8.3f} {r['b1_speed_vs_fp32']:6.2f} {r['b8_speed_vs_fp32']:6.2f}")
    return rows


def cuda_kernels(graph, target) -> dict:
    """The op types of ONNX Runtime CUDA's optimized QDQ model, and which provider runs each node."""
    import collections

    from aligner.backends import make_runner

    runner = make_runner(graph, target)
    optimized = runner._runner.optimized_model()
    ops = collections.Counter(n.op_type for n in optimized.graph.node)
    print("ORT CUDA optimized QDQ graph:", dict(ops.most_common()))
    return {"op_types": dict(ops.most_common())}


def isolate(graph, target, dataset, pre) -> dict:
    from aligner.search.bisect import bisect

    x = next(iter(dataset.batches(pre, 1)))[0]
    verdict = bisect(graph, target=target, feeds={"pixels": x}, strategy="isolate")
    own = sorted(verdict.local_errors, key=lambda e: -e.metrics.get("rel_l2", 0))[:10]
    rows = [{"node": e.node, "op": e.op_type, "rel_l2": round(e.metrics.get("rel_l2", float("nan")), 4),
             "emulated_rel_l2": round(e.metrics.get("emulated_rel_l2", float("nan")), 4), "diverges": e.diverges} for e in own]
    for r in rows:
        print(f"{r['node']:<40} {r['op']:<10} own rel_l2 {r['rel_l2']:.4f} (Q/DQ in float on CPU {r['emulated_rel_l2']:.4f})")
    return {"first_divergent": getattr(verdict.first_divergent, "tensor", None), "explanation": verdict.explanation, "top": rows}


def search(graph, target, dataset, adapter, pre, max_trials: int) -> dict:
    from aligner.backends import reference_runner
    from aligner.eval.run import coco_acceptance
    from aligner.search.precision import search_precision

    x = [{"pixels": b[0]} for _, b in zip(range(2), dataset.batches(pre, 1))]
    start = time.perf_counter()
    plan = search_precision(graph, target, samples=x, accept=coco_acceptance(dataset, adapter, pre, reference_runner(graph), 0.005),
                            max_trials=max_trials, sweep=False)
    row = {"passed": plan.passed, "float_nodes": plan.fp32_nodes, "trials": plan.trials, "seconds": round(time.perf_counter() - start, 1),
           "notes": list(plan.notes)}
    print(f"search on {target.base}: passed={plan.passed} float nodes {len(plan.fp32_nodes)} trials {plan.trials} in {row['seconds']} s")
    return row


def trt_builds(graph, calib: Path, plan: Path, work: Path) -> dict:
    from aligner.backends.target import Target
    from aligner.build import build

    rows = {}
    shapes = {"pixels": (1, 3, 128, 128)}
    for name, spec in (("trt:fp16", "trt:fp16"), ("trt:int8 (full)", "trt:int8"), ("trt:int8+plan", "trt:int8+plan"),
                       ("trt:int8+plan fp16 fallback", "trt:int8+plan@fallback=fp16")):
        target = Target.parse(spec, plan=str(plan) if "plan" in spec else None)
        if target.is_quantized:
            target = target.with_options({"calib": str(calib)})
        start = time.perf_counter()
        try:
            result = build(graph, target, work / f"{name.replace(' ', '_').replace(':', '_')}.engine", plan=str(plan),
                           input_shapes=shapes, write_anyway=True)
            rows[name] = {"built": result.written, "seconds": round(time.perf_counter() - start, 1), "engine": result.engine,
                          "check": result.check.to_dict() if result.check else None}
        except Exception as exc:  # noqa: BLE001
            rows[name] = {"built": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}
        print(name, json.dumps(rows[name], default=str)[:400])
    return rows


if __name__ == "__main__":
    main()
