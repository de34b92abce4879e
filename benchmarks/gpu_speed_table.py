"""The seeds' speed table: PyTorch eager vs ONNX Runtime CUDA, FP32 / FP16 / the plan, batch 1-32.

Run on the GPU machine (onnxruntime-gpu staged):

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_speed_table.py --out $OUT

For the example detector (its committed plan; PyTorch with the same architecture and random
weights — speed does not depend on the values) and DETR-R50 at 512x512 (plan searched on
ort:cuda:fp16 with the default acceptance). Writes bench_*.json and one report with the
latency-vs-throughput charts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _work import work_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.backends.target import Target  # noqa: E402
from aligner.bench import bench  # noqa: E402
from aligner.cli.bench import print_bench  # noqa: E402
from aligner.examples import shapes_detector_path  # noqa: E402
from aligner.examples.shapes_detector import build as build_shapes  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402
from aligner.report import write_report, write_run  # noqa: E402
from aligner.search.precision import search_precision  # noqa: E402

TARGETS = ["torch:cuda:fp32", "torch:cuda:fp16", "ort:cuda:fp32", "ort:cuda:fp16", "ort:cuda:fp16+plan"]
BATCHES = [1, 2, 4, 8, 16, 32]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, help="folder for bench_*.json, run_* and speed.html (default: a new one under benchmarks/work/)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--only", choices=("shapes", "detr"), help="one of the two models")
    args = ap.parse_args()
    args.out = args.out or work_dir("speed-table-")
    runs = []
    detector = ModelGraph.load(shapes_detector_path())
    plan = [p["node"] for p in json.loads((ROOT / "datasets" / "shapes_detector.plan.json").read_text())["fp32_nodes"]]
    cases = [("shapes detector", detector, build_shapes(), plan)] if args.only != "detr" else []

    from transformers import DetrConfig, ResNetConfig

    from aligner.examples.testmodels import build_detr

    config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    if args.only == "shapes":
        config = None
    detr = build_detr(config) if config is not None else None
    path = args.out / "detr_r50.onnx"
    if detr is not None:
        torch.onnx.export(detr, (torch.rand(1, 3, 512, 512),), str(path), opset_version=16, dynamo=False, input_names=["pixel_values"],
                          output_names=["logits", "boxes"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "boxes": {0: "batch"}})
    if detr is not None:
        detr_graph = ModelGraph.load(path)
        detr_plan = search_precision(detr_graph, "ort:cuda:fp16").fp32_nodes
        cases.append(("DETR-R50 512x512", detr_graph, detr, detr_plan))
    for label, graph, module, pins in cases:
        print(f"\n## {label} (plan: {len(pins)} FP32 node(s))")
        with_plan = [Target.parse(t[: -len("+plan")], pins=pins) for t in TARGETS if t.endswith("+plan")] if pins else []  # an empty plan is pure FP16
        targets = [Target.parse(t) for t in TARGETS if not t.endswith("+plan")] + with_plan
        result = bench(graph, targets, BATCHES, runs=args.runs, warmup=10, torch_module=module)
        print_bench(result)
        name = label.split()[0].lower()
        (args.out / f"bench_{name}.json").write_text(json.dumps(result.to_dict(), indent=1))
        print("| target | batch | median ms | p90 ms | items/s |")
        print("|---|---|---|---|---|")
        for r in result.rows:
            print(f"| {r.target} | {r.batch} | {r.latency_ms['median']:.3f} | {r.latency_ms['p90']:.3f} | {r.throughput:.1f} |")
        runs.append(write_run(args.out / f"run_{name}", "bench", graph, result.to_dict(), force=True))
    write_report(runs, args.out / "speed.html", force=True, title="speed tables")


if __name__ == "__main__":
    main()
