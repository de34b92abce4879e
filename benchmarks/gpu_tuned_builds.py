"""Tuned builds (issue 18): FP32 / TF32 / FP16 / FP16+plan on ONNX Runtime CUDA, default vs tuned options.

Run on the device after staging onnxruntime-gpu (../shared/gpu/stage), from the repository root:

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_tuned_builds.py

CPU smoke test (small DETR, batch 1 and 2, ort:cpu targets, a few runs):

    python benchmarks/gpu_tuned_builds.py --device cpu --quick

Models: DETR-R50 (transformers, random weights, the builder of ``make_detr_r50.py``) at 480x640
and 800x800, exported with a dynamic batch; the example shapes detector with its committed plan.
For each model and build: ``aligner.build`` (the precision rewrite, checked on the emulator at
batch 1), ``aligner.tune`` at batch 8 (the documented ORT CUDA candidates, interleaved rounds,
accuracy checked against the FP32 model), then ``aligner.bench`` (I/O on the GPU, medians) of the
default and the tuned options at batch 1 and 8. The DETR plan is searched on ``ort:cuda:fp16``
(random weights rarely need one: an empty plan makes FP16+plan the FP16 row). FLOPs are those of
Conv/MatMul/Gemm in the ONNX graph with shapes inferred; achieved throughput is reported as a
fraction of the H200's dense FP16 tensor-core peak (989 TFLOP/s, H100/H200 SXM).

Writes ``results.json`` and ``table.md`` under ``$OUT`` (else ``--out``, else a new folder under
``benchmarks/work/``). Cases left when ``--budget-s`` (default 420 s) has passed are skipped and
listed, so the run stays under 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from _work import work_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.backends import reference_runner  # noqa: E402
from aligner.backends.target import Target  # noqa: E402
from aligner.bench import bench  # noqa: E402
from aligner.build import build  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402
from aligner.inputs import make_inputs  # noqa: E402
from aligner.tune import TuneSettings, tune  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense FP16 tensor-core peak
START = time.perf_counter()


def log(line: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {line}", flush=True)


def conv_matmul_flops(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[float, int]:
    """FLOPs (2 per multiply-add) of the Conv, MatMul and Gemm nodes with ``shapes`` fed, from ONNX
    Runtime's symbolic shape inference (ONNX's, with data propagation, where that fails); and how
    many such nodes had shapes it could not infer."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for value in skeleton.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, n in zip(dims, shapes[value.name]):
                d.Clear()
                d.dim_value = n
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(skeleton, auto_merge=True)
    except Exception:  # noqa: BLE001 - a helper script of ONNX Runtime's; ONNX's own inference is the fallback
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    dims: dict[str, list[int | None]] = {t.name: list(t.dims) for t in model.graph.initializer}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.tensor_type.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    total, unknown = 0.0, 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        a, w, y = dims.get(node.input[0]), dims.get(node.input[1]), dims.get(node.output[0])
        if not a or not w or not y or None in a + w + y:
            unknown += 1
            continue
        if node.op_type == "Conv":
            total += 2.0 * np.prod(y) * np.prod(w[1:])  # out elements x (Cin/group x kernel)
        elif node.op_type == "MatMul":
            total += 2.0 * np.prod(y) * a[-1]
        else:
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            total += 2.0 * np.prod(y) * (a[0] if trans_a else a[1])
    return float(total), unknown


def export_detr(path: Path, height: int, width: int, small: bool) -> Path:
    """DETR-R50 (``small``: the tests' small DETR) exported with a dynamic batch dimension."""
    import torch

    from aligner.examples.testmodels import build_detr, export_onnx

    config = None
    if not small:
        from transformers import DetrConfig, ResNetConfig

        config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    export_onnx(build_detr(config), (torch.randn(1, 3, height, width),), path, dynamo=False, input_names=["pixel_values"],
                output_names=["logits", "boxes"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "boxes": {0: "batch"}})
    return path


def models(args, work: Path) -> list[tuple[str, Path, tuple[int, int], list[str] | None]]:
    """(name, ONNX path, (H, W), plan pins or None to search one) for each model asked for."""
    from aligner.examples import shapes_detector_path

    out = []
    sizes = {"detr480x640": (480, 640), "detr800x800": (800, 800)} if not args.quick else {"detr480x640": (48, 64), "detr800x800": (64, 64)}
    for name in args.models:
        if name == "shapes":
            plan = json.loads((ROOT / "datasets" / "shapes_detector.plan.json").read_text())
            out.append(("shapes detector 128x128", shapes_detector_path(), (128, 128), [p["node"] for p in plan["fp32_nodes"]]))
            continue
        h, w = sizes[name]
        log(f"exporting {name} ({'small DETR' if args.quick else 'DETR-R50'} {h}x{w})")
        out.append((f"{'DETR (small)' if args.quick else 'DETR-R50'} {h}x{w}", export_detr(work / f"{name}.onnx", h, w, args.quick), (h, w), None))
    return out


def builds(device: str) -> list[tuple[str, str, bool]]:
    """(row label, precision, with the plan) per build."""
    rows = [("FP32 (TF32 off)", "fp32", False)] + ([("TF32", "tf32", False)] if device == "cuda" else [])
    return rows + [("FP16", "fp16", False), ("FP16+plan", "fp16", True)]


def run_model(name: str, path: Path, hw: tuple[int, int], pins: list[str] | None, args, work: Path, settings: TuneSettings) -> dict:
    graph = ModelGraph.load(path)
    inp = graph.input_names[0]
    feeds = {b: make_inputs(graph, {inp: (b, 3, *hw)}) for b in args.batches}
    tune_batch = max(args.batches)
    flops = {b: conv_matmul_flops(graph.model, {inp: (b, 3, *hw)}) for b in args.batches}
    if pins is None:
        from aligner.search.precision import search_precision

        log(f"{name}: searching a plan on {args.device}")
        pins = list(search_precision(graph, f"ort:{args.device}:fp16" if args.device == "cuda" else "emu:fp16",
                                     samples=[feeds[min(args.batches)]]).fp32_nodes)
    log(f"{name}: plan keeps {len(pins)} node(s) FP32; reference outputs at batch {tune_batch} on ort:cpu:fp32")
    expected = reference_runner(graph).run(feeds[tune_batch])
    result = {"model": name, "input": [3, *hw], "plan_pins": len(pins), "tune_batch": tune_batch,
              "gflop": {b: f[0] / 1e9 for b, f in flops.items()}, "flop_nodes_unknown": flops[tune_batch][1], "builds": [], "skipped": []}
    for label, precision, with_plan in builds(args.device):
        if time.perf_counter() - START > args.budget_s:
            result["skipped"].append(label)
            log(f"{name} {label}: skipped (past the {args.budget_s} s budget)")
            continue
        if with_plan and not pins:
            result["builds"].append({"build": label, "note": "plan is empty: same model as FP16"})
            continue
        target = Target.parse(f"ort:{args.device}:{precision}", pins=pins if with_plan else ())
        built = graph
        if precision == "fp16":
            out = work / f"{path.stem}.{label.replace('+', '_').lower()}.onnx"
            made = build(graph, target, out, check_inputs=feeds[min(args.batches)], force=True)
            if not made.written:
                result["builds"].append({"build": label, "note": f"not written: check on {made.check.on} diverged {list(made.check.diverging)}"})
                continue
            built = ModelGraph.load(out)
        log(f"{name} {label}: tuning at batch {tune_batch}")
        tuned = tune(built, target, reference=graph, feeds=feeds[tune_batch], settings=settings, expected=expected,
                     progress=lambda line: log(f"  {line}"))
        default = next(c for c in tuned.candidates if not c.options)
        # bench times in-process: a default the tuner saw crash or fail is not timed again
        targets = ([target] if default.status == "ok" else []) + ([tuned.target] if tuned.target != target else [])
        if not targets:
            result["builds"].append({"build": label, "note": f"no candidate passed: {tuned.decision}",
                                     "candidates": [c.to_dict() for c in tuned.candidates]})
            continue
        measured = bench(built, targets, args.batches, runs=args.runs, warmup=args.warmup)
        med = {(r.target, r.batch): r.latency_ms["median"] for r in measured.rows}
        rows = []
        for b in args.batches:
            default_ms, tuned_ms = med.get((str(target), b), float("nan")), med[str(tuned.target), b]
            tflops = flops[b][0] / (tuned_ms / 1e3) / 1e12
            rows.append({"batch": b, "default_ms": default_ms, "tuned_ms": tuned_ms, "speedup": default_ms / tuned_ms,
                         "tflops": tflops, "peak_fraction": tflops / PEAK_TFLOPS,
                         "default_status": default.status if default.status != "ok" else "ok"})
        result["builds"].append({"build": label, "target": str(target), "default_reason": default.reason if default.status != "ok" else "", "tuned_target": str(tuned.target),
                                 "tuned_options": dict(tuned.chosen or ()), "decision": tuned.decision, "rows": rows,
                                 "candidates": [c.to_dict() for c in tuned.candidates],
                                 "inversions": [i.to_dict() for i in measured.inversions]})
        log(f"{name} {label}: " + "; ".join(f"b{r['batch']} {r['default_ms']:.3f} -> {r['tuned_ms']:.3f} ms" for r in rows))
    return result


def table(results: list[dict], device: str) -> str:
    lines = [f"| model | build | batch | default ms | tuned ms | tuned options | tuned / default | GFLOP | TFLOP/s | of {PEAK_TFLOPS:.0f} TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for b in res["builds"]:
            if "rows" not in b:
                lines.append(f"| {res['model']} | {b['build']} | | | | {b['note']} | | | | |")
                continue
            options = ",".join(f"{k}={v}" for k, v in b["tuned_options"].items()) or "defaults"
            if b.get("default_reason"):
                options += f" (defaults rejected: {b['default_reason'][:60]}...)"
            for r in b["rows"]:
                lines.append(f"| {res['model']} | {b['build']} | {r['batch']} | {r['default_ms']:.3f} | {r['tuned_ms']:.3f} | {options} | "
                             f"{r['speedup']:.2f}x | {res['gflop'][r['batch']]:.2f} | {r['tflops']:.1f} | {r['peak_fraction']:.1%} |")
        for label in res["skipped"]:
            lines.append(f"| {res['model']} | {label} | | | | skipped: time budget | | | | |")
    lines += ["", *summary(results, device)]
    return "\n".join(lines)


def summary(results: list[dict], device: str) -> list[str]:
    """Tuned FP16 against TF32 and FP32 (their best of default and tuned), per model and batch."""
    out = []
    for res in results:
        best = {b["build"]: {r["batch"]: np.nanmin([r["default_ms"], r["tuned_ms"]]) for r in b["rows"]} for b in res["builds"] if "rows" in b}
        fp16 = {b["build"]: {r["batch"]: r["tuned_ms"] for r in b["rows"]} for b in res["builds"] if "rows" in b}.get("FP16")
        if not fp16:
            continue
        for batch, ms in fp16.items():
            parts = [f"{other} {best[other][batch]:.3f} ms ({best[other][batch] / ms:.2f}x)" for other in ("TF32", "FP32 (TF32 off)") if other in best]
            out.append(f"* {res['model']} batch {batch}: tuned FP16 {ms:.3f} ms; vs best " + ", ".join(parts))
    if out:
        out.insert(0, "Targets (issue 18, DETR-R50 480x640): tuned FP16 b8 >= 1.3x faster than TF32 and >= 2.5x than FP32; b1 no slower than TF32." if device == "cuda" else "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="smoke test: a small DETR at small sizes, batches 1,2, few runs")
    ap.add_argument("--models", default="detr480x640,shapes,detr800x800", help="comma-separated: detr480x640, shapes, detr800x800 (in this order of priority)")
    ap.add_argument("--out", type=Path, help="output folder (default $OUT, else a new one under benchmarks/work/)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the builds left after this many seconds (default 420)")
    args = ap.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batches = [1, 2] if args.quick else [1, 8]
    args.runs, args.warmup = (3, 1) if args.quick else (50, 10)
    settings = TuneSettings(rounds=1, runs=2, warmup=1) if args.quick else TuneSettings(rounds=3, runs=10, warmup=3)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work_dir("tuned-builds-"))
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir("tuned-builds-models-")
    import onnxruntime as ort

    log(f"onnxruntime {ort.__version__} {ort.get_available_providers()}; device {args.device}; out {out}")
    results = [run_model(*case, args, work, settings) for case in models(args, work)]
    text = table(results, args.device)
    print(text)
    (out / "results.json").write_text(json.dumps({"onnxruntime": ort.__version__, "device": args.device, "peak_tflops": PEAK_TFLOPS,
                                                  "seconds": time.perf_counter() - START, "models": results}, indent=1))
    (out / "table.md").write_text(text + "\n")
    log(f"wrote {out / 'results.json'} and {out / 'table.md'}")


if __name__ == "__main__":
    main()
