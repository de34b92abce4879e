"""INT8 on the example detector: COCO AP and ORT CPU latency of FP32, full INT8 and INT8 + plan.

    python benchmarks/int8_detector.py [--max-drop 0.005] [--max-trials 150] [--out benchmarks/int8_detector.json]

Calibration: 32 images of a *separate* synthetic split (another seed), never the evaluation
images. The plan is searched with the COCO AP of the 200 val images as the acceptance (AP drop <=
--max-drop vs FP32), every trial quantized by ONNX Runtime's quantizer and run on its integer
kernels (ort:cpu:int8), after the quantizer-settings sweep. Also reported: the plan searched on
output rel_l2 alone (half of full INT8's worst), to show how far output error is from task accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-drop", type=float, default=0.005, help="allowed AP drop (0-1; 0.005 = half a point)")
    ap.add_argument("--max-trials", type=int, default=150)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="int8-detector-") as tmp:
        report = run(args, Path(tmp))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def detector_and_calibration(work: Path):
    """The example detector, its val set (200 images), preprocessing and adapter, and a folder of 32
    calibration .npz from a separate split (seed 4242): (graph, dataset, preprocess, adapter, calib dir)."""
    from aligner import examples
    from aligner.eval.dataset import CocoDataset
    from aligner.examples.shapes import write_split
    from aligner.graph.model import ModelGraph

    graph = ModelGraph.load(examples.shapes_detector_path())
    images, ann = examples.shapes_val()
    dataset, pre, adapter = CocoDataset(images, ann), examples.shapes_preprocess(), examples.shapes_adapter()
    write_split(work / "calib_split", 32, seed=4242)
    calib = work / "calib"
    calib.mkdir()
    for i, (x, _, _) in enumerate(CocoDataset(work / "calib_split" / "images", work / "calib_split" / "instances.json").batches(pre, 1)):
        np.savez(calib / f"{i:03d}.npz", pixels=x)
    return graph, dataset, pre, adapter, calib


def run(args: argparse.Namespace, work: Path) -> dict:
    from aligner.backends import make_runner, reference_runner
    from aligner.backends.target import Target
    from aligner.compare.metrics import rel_l2
    from aligner.eval.run import coco_acceptance, evaluate_detector
    from aligner.search.precision import Acceptance, search_precision

    graph, dataset, pre, adapter, calib = detector_and_calibration(work)
    held = [{"pixels": x} for i, (x, _, _) in zip(range(16), dataset.batches(pre, 1))]
    int8 = Target.parse("ort:cpu:int8").with_options({"calib": str(calib)})
    report: dict = {"model": "aligner/examples/data/shapes_detector.onnx", "calibration": "32 images, separate split (seed 4242)",
                    "evaluation": "200 val images (COCO AP)", "max_ap_drop": args.max_drop}

    start = time.perf_counter()
    plan_ap = search_precision(graph, int8, samples=held[:2], accept=coco_acceptance(dataset, adapter, pre, reference_runner(graph), args.max_drop),
                               max_trials=args.max_trials, sweep=True, progress=_progress)
    report["plan_ap"] = {**_summary(plan_ap), "seconds": round(time.perf_counter() - start, 1)}

    tuned = Target.parse(plan_ap.target)
    full = make_runner(graph, tuned.with_pins(()))
    worst_full = max(rel_l2(reference_runner(graph).run(h)["detections"], full.run(h)["detections"]) for h in held)
    start = time.perf_counter()
    plan_rel = search_precision(graph, tuned.with_pins(()), samples=held, accept=Acceptance.parse([f"rel_l2<={worst_full / 2:.4g}"]),
                                max_trials=args.max_trials, progress=_progress)
    report["plan_rel_l2"] = {**_summary(plan_rel), "accept": f"rel_l2<={worst_full / 2:.4g} (half of full INT8's worst)",
                             "seconds": round(time.perf_counter() - start, 1)}

    targets = {"fp32": Target.parse("ort:cpu:fp32"), "int8": tuned.with_pins(()), "int8+plan(AP)": tuned.with_pins(plan_ap.fp32_nodes),
               "int8+plan(rel_l2)": tuned.with_pins(plan_rel.fp32_nodes)}
    result = evaluate_detector(graph, dataset, adapter, pre, [str(t) for t in targets.values()])
    x = held[0]
    for (name, target), row in zip(targets.items(), result.targets):
        runner = make_runner(graph, target.with_options({"graph_optimization_level": "all"}) if name == "fp32" else target)
        times = runner.time(x, runs=200, warmup=20)
        report.setdefault("targets", {})[name] = {"target": str(target), "AP": round(row.stats["AP"], 4), "AP50": round(row.stats["AP50"], 4),
                                                  "float_nodes": len(target.pins), "median_ms": round(statistics.median(times), 3)}
    base = report["targets"]["fp32"]["median_ms"]
    for row in report["targets"].values():
        row["speed_vs_fp32"] = round(base / row["median_ms"], 2)
    return report


def _progress(trial, n: int) -> None:
    print(f"trial {n:3d} {trial.phase:<8} {len(trial.pins):4d} float nodes  {'pass' if trial.passed else 'fail'}  {trial.reason[:80]}", flush=True)


def _summary(plan) -> dict:
    return {"passed": plan.passed, "float_nodes": plan.fp32_nodes, "trials": plan.trials, "culprit_runs": plan.culprit_runs,
            "settings": plan.quantization.get("settings"), "final_metrics": {k: round(v, 5) for k, v in plan.final_metrics.items()
                                                                             if k in ("rel_l2", "max_abs")},
            "notes": list(plan.notes)}


if __name__ == "__main__":
    main()
