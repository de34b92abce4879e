"""INT8 float-fallback search: aligner vs ORT ``qdq_loss_debug`` + greedy exclusion vs NNCF accuracy control.

Models with trained weights, shipped in a PyPI wheel (RapidOCR's PP-OCR models): the DBNet text
detector (``ch_PP-OCRv4_det_infer.onnx``) and the MobileNet-style text direction classifier
(``ch_ppocr_mobile_v2.0_cls_infer.onnx``). Inputs are synthetic text images drawn with PIL
(dark words on light noisy backgrounds): 16 for calibration, 16 held out.

Acceptance, the same for every tool: mean output rel_l2 over the 16 held-out images <= half of
what full INT8 (ORT quantize_static, QDQ, u8s8, per-channel, MinMax) gives. Each tool's float
fallback set is then checked for unnecessary members: a member whose removal alone still passes
(zero for a 1-minimal set).

What is counted: aligner's ``trials`` (each one quantize_static + the 16 held-out images on ORT's
integer kernels) and, apart, its ``emulated_runs`` (the ranking: one run per quantized tensor of a
switchable Q/DQ model, the calibration images batched, no quantizer call); NNCF's
``validation_fn_calls`` (each one the 16 held-out images; its ranking calls included); the ORT
greedy baseline's quantize + evaluate calls.

Requirements (benchmark only, not aligner's):  pip install rapidocr-onnxruntime==1.4.4 nncf==3.4.0
(NNCF is skipped, with a note, when not installed.)

    python benchmarks/int8_vs_baselines.py [--models cls,det] [--det-size 320] [--out benchmarks/int8_vs_baselines.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

MODELS = {"cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192), (0.5, 0.5)),
          "det": ("ch_PP-OCRv4_det_infer.onnx", None, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))}
WORDS = "the quick brown fox jumps over lazy dog 0123456789 ONNX runtime INT8 text detector classifier".split()


def text_images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``count`` RGB uint8 images (H, W, 3) with a few random words each."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = size
        base = rng.integers(170, 255, 3)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(max(1, h // 40)):
            font = ImageFont.load_default(size=int(rng.integers(max(10, h // 6), max(12, h // 3))))
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
            xy = (int(rng.integers(0, max(1, w // 3))), int(rng.integers(0, max(1, h - h // 3))))
            draw.text(xy, text, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=font)
        if rng.random() < 0.5 and h == 48:
            img = img.rotate(180)
        out.append(np.asarray(img))
    return out


def preprocess(images: list[np.ndarray], mean, std) -> list[np.ndarray]:
    mean, std = np.asarray(mean, np.float32).reshape(-1, 1, 1), np.asarray(std, np.float32).reshape(-1, 1, 1)
    return [((im.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std)[None] for im in images]


class MeanRelL2:
    """The acceptance: mean output rel_l2 over the held-out samples, computed from a function that runs them."""

    def __init__(self, reference: list[dict], bound: float = float("inf")):
        self.reference, self.bound, self.calls = reference, bound, 0

    def value(self, outputs: list[dict]) -> float:
        from aligner.compare.metrics import rel_l2

        return float(np.mean([np.mean([rel_l2(r[k], o[k]) for k in r]) for r, o in zip(self.reference, outputs)]))


def ort_outputs(model: onnx.ModelProto | str, samples: list[dict]) -> list[dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, s))) for s in samples]


def latency_ms(model: onnx.ModelProto | str, sample: dict, runs: int = 30) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, sample)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ort_quantize(float_path: Path, calib: list[dict], exclude: list[str], work: Path) -> onnx.ModelProto:
    """ORT quantize_static, QDQ, u8s8, per-channel, MinMax (the settings every tool is measured with)."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    out = work / "q.onnx"
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibration_cache_path=str(work / f"{float_path.stem}_ranges.json"))  # one per model
    return onnx.load(str(out))


def unnecessary(members: list[str], passes) -> int:
    """Members of a passing fallback set whose removal alone still passes."""
    return sum(1 for m in members if passes([x for x in members if x != m]))


def run_aligner(float_path: Path, calib_dir: Path, calib: list[dict], held: list[dict], check: MeanRelL2, work: Path) -> dict:
    from aligner.backends.target import Target
    from aligner.graph.model import ModelGraph
    from aligner.search.precision import Acceptance, search_precision

    graph = ModelGraph.load(float_path)
    target = Target.parse("ort:cpu:int8@calibrate=minmax,types=u8s8,per_channel=1,reduce_range=0").with_options({"calib": str(calib_dir)})

    def task(runner) -> str:
        check.calls += 1
        value = check.value([runner.run(dict(s)) for s in held])
        return "" if value <= check.bound else f"mean rel_l2 {value:.4g} > {check.bound:.4g}"

    start = time.perf_counter()
    plan = search_precision(graph, target, samples=held[:1], accept=Acceptance(threshold=math.inf, task=task, task_name="mean rel_l2"),
                            max_trials=1000)
    seconds = time.perf_counter() - start
    model = ort_quantize(float_path, calib, plan.fp32_nodes, work)
    value = check.value(ort_outputs(model, held))
    # trials: quantize + run on the 16 held-out images (the task ran in check.calls of them; the others failed the
    # finiteness check first); emulated runs: one image each on the switchable Q/DQ model (ranking), no quantizer call
    return {"float_nodes": plan.fp32_nodes, "trials": plan.trials, "task_calls": check.calls,
            "emulated_runs": plan.quantization.get("emulated_runs"), "tensor_groups": plan.quantization.get("tensor_groups"),
            "notes": list(plan.notes), "seconds": round(seconds, 1), "mean_rel_l2": round(value, 5), "passed": plan.passed, "model": model}


def run_ort_greedy(float_path: Path, calib: list[dict], held: list[dict], check: MeanRelL2, work: Path) -> dict:
    """qdq_loss_debug's per-tensor SQNR (float vs QDQ model) ranks the nodes writing each tensor; exclude in
    rank order (worst first), re-quantizing and checking after each, until the acceptance passes."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error, create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    class Reader(CalibrationDataReader):
        def __init__(self, data):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    start = time.perf_counter()
    qdq = ort_quantize(float_path, calib, [], work)
    onnx.save(qdq, str(work / "qdq_full.onnx"))
    modify_model_output_intermediate_tensors(str(float_path), str(work / "float_aug.onnx"))
    modify_model_output_intermediate_tensors(str(work / "qdq_full.onnx"), str(work / "qdq_aug.onnx"))
    subset = held[:4]  # qdq_loss_debug keeps every activation of every sample in memory
    errors = compute_activation_error(create_activation_matching(collect_activations(str(work / "qdq_aug.onnx"), Reader(subset)),
                                                                 collect_activations(str(work / "float_aug.onnx"), Reader(subset))))
    producer = {o: n.name for n in onnx.load(str(float_path)).graph.node for o in n.output}
    ranked = [producer[t] for t, e in sorted(errors.items(), key=lambda kv: kv[1].get("xmodel_err", float("inf"))) if t in producer]
    ranked = list(dict.fromkeys(ranked))
    excluded: list[str] = []
    calls = 0
    value = float("inf")
    for node in ranked:
        excluded.append(node)
        calls += 1
        value = check.value(ort_outputs(ort_quantize(float_path, calib, excluded, work), held))
        if value <= check.bound:
            break
    model = ort_quantize(float_path, calib, excluded, work)
    return {"float_nodes": excluded, "trials": calls, "seconds": round(time.perf_counter() - start, 1), "mean_rel_l2": round(value, 5),
            "passed": value <= check.bound, "model": model}


def run_nncf(float_path: Path, calib: list[dict], held: list[dict], check: MeanRelL2, full_value: float) -> dict:
    if importlib.util.find_spec("nncf") is None:
        return {"skipped": "nncf is not installed (pip install nncf==3.4.0)"}
    import nncf

    import logging

    calls = {"n": 0}
    reverted: list[str] = []

    class Reverted(logging.Handler):  # NNCF logs "K out of N were reverted back to the floating-point precision: ..."
        def emit(self, record):
            text = record.getMessage()
            if "were reverted back" in text:
                reverted.append(text.split(":")[0])

    logging.getLogger("nncf").addHandler(Reverted())

    def validate(model: onnx.ModelProto, dataset) -> float:
        calls["n"] += 1
        data = dataset.get_inference_data() if hasattr(dataset, "get_inference_data") else dataset
        return 1.0 - check.value(ort_outputs(model, list(data)))  # FP32 scores 1 (NNCF divides by it)

    start = time.perf_counter()
    model = nncf.quantize_with_accuracy_control(onnx.load(str(float_path)), nncf.Dataset(calib), nncf.Dataset(held), validate,
                                                max_drop=check.bound, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
    seconds = time.perf_counter() - start
    value = check.value(ort_outputs(model, held))
    quantizers = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if not quantizers:  # "could not achieve the required accuracy drop": NNCF hands back the float model
        reverted.append("all (NNCF gave up and returned the float model: no QuantizeLinear left)")
    return {"validation_fn_calls": calls["n"], "seconds": round(seconds, 1), "mean_rel_l2": round(value, 5),
            "passed": value <= check.bound and quantizers > 0, "quantize_linear_nodes": quantizers,
            "float_nodes": reverted[-1] if reverted else "see NNCF's log (reverted ops)", "model": model}


def bench_model(name: str, wheel_models: Path, det_size: int, work: Path, tools: tuple[str, ...] = ("aligner", "ort", "nncf")) -> dict:
    from aligner.graph.model import ModelGraph

    file, shape, (mean, std) = MODELS[name]
    float_path = work / f"{name}_named.onnx"  # PaddlePaddle exports leave node names empty: every tool gets aligner's names
    onnx.save(ModelGraph.load(wheel_models / file).model, str(float_path))
    size = (shape[1], shape[2]) if shape else (det_size, det_size)
    model_input = onnx.load(str(float_path)).graph.input[0].name
    calib = [{model_input: x} for x in preprocess(text_images(16, size, seed=1), mean, std)]
    held = [{model_input: x} for x in preprocess(text_images(16, size, seed=2), mean, std)]
    calib_dir = work / f"{name}_calib"
    calib_dir.mkdir(exist_ok=True)
    for i, s in enumerate(calib):
        np.savez(calib_dir / f"{i:03d}.npz", **s)
    reference = ort_outputs(str(float_path), held)
    check = MeanRelL2(reference)
    full = ort_quantize(float_path, calib, [], work)
    full_value = check.value(ort_outputs(full, held))
    check.bound = full_value / 2
    fp32_ms, int8_ms = latency_ms(str(float_path), held[0]), latency_ms(full, held[0])

    def passes(members: list[str]) -> bool:
        return check.value(ort_outputs(ort_quantize(float_path, calib, members, work), held)) <= check.bound

    print(f"{name}: full INT8 mean rel_l2 {full_value:.4g}, accept <= {check.bound:.4g}; FP32 {fp32_ms:.2f} ms, INT8 {int8_ms:.2f} ms", flush=True)
    row = {"model": file, "input": list(held[0][model_input].shape), "full_int8_mean_rel_l2": round(full_value, 5),
           "accept_mean_rel_l2": round(check.bound, 5), "fp32_ms": round(fp32_ms, 2), "full_int8_ms": round(int8_ms, 2), "tools": {}}
    runs = {"aligner": ("aligner", lambda: run_aligner(float_path, calib_dir, calib, held, check, work)),
            "ort": ("ort_qdq_loss_debug_greedy", lambda: run_ort_greedy(float_path, calib, held, check, work)),
            "nncf": ("nncf_accuracy_control", lambda: run_nncf(float_path, calib, held, check, full_value))}
    for tool, fn in (runs[t] for t in tools):
        print(f"{name}: {tool}...", flush=True)
        result = fn()
        model = result.pop("model", None)
        if model is not None:
            result["latency_ms"] = round(latency_ms(model, held[0]), 2)
            result["speed_vs_fp32"] = round(fp32_ms / result["latency_ms"], 2)
        if isinstance(result.get("float_nodes"), list):
            result["float_node_count"] = len(result["float_nodes"])
            result["unnecessary"] = unnecessary(result["float_nodes"], passes) if result.get("passed") else None
            if len(result["float_nodes"]) > 40:
                result["float_nodes"] = result["float_nodes"][:40] + [f"... {len(result['float_nodes']) - 40} more"]
        row["tools"][tool] = result
        print(json.dumps({tool: result}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cls,det")
    ap.add_argument("--tools", default="aligner,ort,nncf", help="which tools to run (comma-separated)")
    ap.add_argument("--det-size", type=int, default=320, help="DBNet input side (the issue's table used 640)")
    ap.add_argument("--wheel-models", help="folder of the RapidOCR .onnx files (default: the installed rapidocr_onnxruntime)")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    if args.wheel_models:
        wheel_models = Path(args.wheel_models)
    else:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        if spec is None:
            raise SystemExit("pip install rapidocr-onnxruntime==1.4.4 (it ships the trained PP-OCR models), or pass --wheel-models DIR")
        wheel_models = Path(spec.origin).parent / "models"
    with tempfile.TemporaryDirectory(prefix="int8-baselines-") as tmp:
        rows = [bench_model(m, wheel_models, args.det_size, Path(tmp), tuple(args.tools.split(","))) for m in args.models.split(",")]
    Path(args.out).write_text(json.dumps({"machine": "2-core AMD EPYC (AVX2, AVX-VNNI), ORT CPU", "rows": rows}, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
