"""OpenVINO through the runtime seam: a model on ov:cpu:fp32, ov:cpu:bf16 and emu:bf16 against the
reference, and the latency of ov:cpu:fp32/bf16 beside ONNX Runtime CPU FP32, in one run.

    python benchmarks/openvino_targets.py                                   # the example detector, 1x3x128x128
    python benchmarks/openvino_targets.py benchmarks/work/detr_r50.onnx --shape pixel_values:1x3x800x800

Prints, per target: the precision OpenVINO really ran (its INFERENCE_PRECISION_HINT after compiling:
bf16 only where the CPU has AVX-512 BF16 or AMX), the layers per runtime precision, the tensors
compared and diverging (compare's default rule for the precision), the first divergent tensor;
then bench's median latency of each timed target (runs interleaved by target, median of the
medians of --rounds rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from aligner.backends import make_runner
from aligner.bench import bench
from aligner.compare.layerwise import compare
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs, parse_input_shapes

COMPARED = ("ov:cpu:fp32", "ov:cpu:bf16", "emu:bf16")
TIMED = ("ort:cpu:fp32", "ov:cpu:fp32", "ov:cpu:bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(shapes_detector_path()))
    p.add_argument("--shape", nargs="+", default=["pixels:1x3x128x128"], help="NAME:DIMS of the generated input")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    graph = ModelGraph.load(args.model)
    shapes = parse_input_shapes(args.shape)
    feeds = make_inputs(graph, shapes)
    if "pixels" in feeds:  # the example detector reads raw 0-255 pixels
        feeds["pixels"] = (np.random.default_rng(0).random(feeds["pixels"].shape) * 255).astype(np.float32)
    import openvino as ov

    core = ov.Core()
    print(f"# {Path(args.model).name}, {platform.processor() or platform.machine()}, {core.get_property('CPU', 'FULL_DEVICE_NAME')}, "
          f"OpenVINO {ov.__version__.split('-')[0]}, capabilities {', '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}, "
          f"{time.strftime('%Y-%m-%d')}")
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # aligner refuses ov:cpu:bf16 here unless asked
        print("# no native BF16 on this CPU: ov:cpu:bf16 runs f32 and is refused without @allow_f32=1, which the rows below pass")
        global COMPARED, TIMED
        COMPARED = tuple(t + "@allow_f32=1" if t == "ov:cpu:bf16" else t for t in COMPARED)
        TIMED = tuple(t + "@allow_f32=1" if t == "ov:cpu:bf16" else t for t in TIMED)
    rows = []
    print("| target | ran in | layers by precision | tensors | diverging | first divergent | compare s |")
    print("|---|---|---|---|---|---|---|")
    for spec in COMPARED:
        start = time.perf_counter()
        result = compare(graph, target=spec, feeds=feeds)
        seconds = time.perf_counter() - start
        ran, layers = "-", "-"
        if spec.startswith("ov"):
            runner = make_runner(graph, spec)
            runner.run(feeds)
            ran, layers = runner.ran_in, ", ".join(f"{k} {v}" for k, v in runner.precision_counts().items())
        first = result.first_divergent
        diverging = sum(1 for d in result.tensors if d.diverges)
        rows.append({"target": spec, "ran_in": ran, "layers": layers, "tensors": len(result.tensors), "diverging": diverging,
                     "first_divergent": first.tensor if first else None, "compare_s": round(seconds, 2)})
        print(f"| {spec} | {ran} | {layers} | {len(result.tensors)} | {diverging} | {first.tensor if first else '-'} | {seconds:.1f} |")
    medians: dict[str, list[float]] = {t: [] for t in TIMED}
    for _ in range(args.rounds):
        for spec in TIMED:
            result = bench(graph, [spec], inputs=feeds, runs=args.runs, warmup=5)
            medians[spec].append(result.rows[0].latency_ms["median"])
    base = statistics.median(medians["ort:cpu:fp32"])
    print("\n| target | median ms (median of rounds) | vs ort:cpu:fp32 |")
    print("|---|---|---|")
    for spec in TIMED:
        m = statistics.median(medians[spec])
        rows.append({"target": spec, "median_ms": round(m, 3), "ratio": round(m / base, 3)})
        print(f"| {spec} | {m:.2f} | {m / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
