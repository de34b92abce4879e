"""ONNX Runtime CUDA latency of the example detector before and after `--fuse layernorm`, FP32 and FP16.

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_fusion_latency.py [--runs 300]

Both models are timed in the same process, interleaved (original, fused, original, fused), with
I/O bound on the GPU (aligner.bench); the table gives the median of the two rounds' medians and
the fused/original ratio. FP16 is the pure FP16 rewrite (no plan) of each model.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.bench import bench  # noqa: E402
from aligner.examples import shapes_detector_path  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402
from aligner.passes import fuse_layernorm  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=int, default=300)
parser.add_argument("--batches", default="1,8,32")
args = parser.parse_args()
original = ModelGraph.load(shapes_detector_path())
fused = ModelGraph(fuse_layernorm(original).model)
models = {"original": original, "fused": fused}
targets, batches = ["ort:cuda:fp32", "ort:cuda:fp16"], [int(b) for b in args.batches.split(",")]
medians: dict[tuple, list[float]] = {}
device = ""
for _round in range(2):
    for label, graph in models.items():
        result = bench(graph, targets, batches, runs=args.runs, warmup=30)
        device = result.device
        for row in result.rows:
            medians.setdefault((label, row.target, row.batch), []).append(row.latency_ms["median"])
print(f"device: {device}; {len(original.nodes)} nodes before, {len(fused.nodes)} after ({len(fuse_layernorm(original).fused)} LayerNorms fused); "
      f"{args.runs} timed runs per cell, 2 interleaved rounds")
print("| target | batch | original ms | fused ms | fused / original |")
print("|---|---|---|---|---|")
for t in targets:
    for b in batches:
        o, f = statistics.median(medians[("original", t, b)]), statistics.median(medians[("fused", t, b)])
        print(f"| {t} | {b} | {o:.3f} | {f:.3f} | {f / o:.3f} |")
