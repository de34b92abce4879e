"""aligner's precision rewrite vs onnxconverter-common's convert_float_to_float16, same models.

    python benchmarks/rewrite_vs_onnxconverter.py

Pure FP16 (no nodes pinned, FP32 I/O kept) on: the built-in tiny ViT (raw-pixel input, an FP16
overflow), a DETR (transformers, random weights, legacy export at opset 16), and the same DETR
with its node names removed (as Paddle-converted models have). For each converter: does the model
pass the ONNX checker, does ONNX Runtime CPU load and run it, output error vs FP32, Casts added,
and what happened to FP32 weights beyond the FP16 range.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from _work import work_dir


def models(tmp: Path) -> dict[str, onnx.ModelProto]:
    from aligner.examples import tiny_vit
    from aligner.examples.testmodels import export_detr

    detr = onnx.load(str(export_detr("legacy", tmp)))
    nameless = onnx.ModelProto()
    nameless.CopyFrom(detr)
    for node in nameless.graph.node:
        node.name = ""
    return {"tiny_vit (raw pixels)": tiny_vit(), "DETR legacy opset 16": detr, "DETR, empty node names": nameless}


def run(model: onnx.ModelProto, feeds) -> tuple[str, np.ndarray | None]:
    from aligner.backends.ort.runner import OrtRunner
    from aligner.backends.target import Target

    try:
        onnx.checker.check_model(model, full_check=True)
        valid = "valid"
    except Exception as exc:  # report, then still try ORT
        valid = f"checker: {str(exc).splitlines()[0][:60]}"
    try:
        out = OrtRunner(model, Target("ort", "cpu", "fp16"), optimize=False).run(feeds)
        return valid, next(iter(out.values()))
    except Exception as exc:
        return f"{valid}; ORT: {str(exc)[:80]}", None


def main() -> None:
    from onnxconverter_common.float16 import convert_float_to_float16

    from aligner import ModelGraph, make_inputs, reference_runner, rewrite_precision

    print("| model | converter | model valid / runs | output rel_l2 vs FP32 | NaN/inf in output | Casts added | out-of-range weights |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models(work_dir("rewrite-vs-onnxconverter-")).items():
        graph = ModelGraph(model)
        feeds = make_inputs(graph)
        if "pixels" in feeds:
            from aligner.examples import example_inputs

            feeds = example_inputs()
        ref = next(iter(reference_runner(graph).run(feeds).values()))
        base_casts = sum(n.op_type == "Cast" for n in model.graph.node)
        rows = []
        try:
            ours = rewrite_precision(graph, [], "fp16")
            over = ", ".join(f"{o.tensor} -> inf" for o in ours.overflows) or "none"
            rows.append(("aligner", ours.model, over))
        except Exception as exc:
            rows.append(("aligner", None, f"failed: {exc}"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                theirs = convert_float_to_float16(model, keep_io_types=True)
            except Exception as exc:
                theirs = None
                rows.append(("onnxconverter-common", None, f"crashed: {type(exc).__name__}: {str(exc)[:60]}"))
        if theirs is not None:
            clipped = [str(w.message)[:70] for w in caught if "truncated" in str(w.message).lower() or "clamp" in str(w.message).lower()]
            rows.append(("onnxconverter-common", theirs, f"clipped silently to +-65504 ({len(clipped)} warning(s))" if clipped else "none"))
        for conv, out_model, over in rows:
            if out_model is None:
                print(f"| {name} | {conv} | - | - | - | - | {over} |")
                continue
            status, out = run(out_model, feeds)
            casts = sum(n.op_type == "Cast" for n in out_model.graph.node) - base_casts
            if out is None:
                print(f"| {name} | {conv} | {status} | - | - | {casts} | {over} |")
                continue
            o = out.astype(np.float64)
            finite = np.isfinite(o)
            err = np.linalg.norm(np.where(finite, o, 0) - ref) / np.linalg.norm(ref)
            print(f"| {name} | {conv} | {status} | {err:.3g} | {int((~finite).sum())} | {casts} | {over} |")


if __name__ == "__main__":
    main()
