"""ONNX Runtime CUDA targets on the GPU machine: compare every tensor against ORT CPU FP32.

Run on the device after staging onnxruntime-gpu (see ../shared/gpu/stage):

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_ort_cuda.py

Prints one row per model and target: tensors compared, the graph output's rel_l2, the first
divergent and first non-finite node, and the wall time of the whole layer-wise compare.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
from _work import work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner import compare  # noqa: E402
from aligner.backends import make_runner  # noqa: E402
from aligner.examples import example_inputs, tiny_vit  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402
from aligner.inputs import make_inputs  # noqa: E402

TARGETS = ["ort:cuda:fp32", "ort:cuda:tf32", "ort:cuda:fp16", "ort:cuda:bf16", "emu:fp16"]


def models(work: Path) -> dict[str, Path]:
    import torch

    from aligner.examples.testmodels import build_cnn, build_detr
    from aligner.examples.testmodels import export_onnx as _export

    out = {"tiny_vit (built-in)": work / "vit.onnx"}
    onnx.save(tiny_vit(), str(out["tiny_vit (built-in)"]))
    out["cnn (legacy)"] = _export(build_cnn(), (torch.randn(1, 3, 32, 32),), work / "cnn.onnx", dynamo=False)
    out["detr (legacy)"] = _export(build_detr(), (torch.randn(1, 3, 96, 96),), work / "detr.onnx", dynamo=False,
                                   input_names=["pixel_values"], output_names=["logits", "boxes"])
    return out


def main(targets: list[str]) -> None:
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    rows = []
    for label, path in models(work_dir("ort-cuda-")).items():
        graph = ModelGraph.load(path)
        feeds = example_inputs() if "vit" in label else make_inputs(graph)  # the ViT takes 0-255 pixels
        for target in targets:
            start = time.perf_counter()
            try:
                runner = make_runner(graph, target)
                runner.run(feeds)  # builds the session once, to read its provider
                providers = runner._session.get_providers()[0]
                result = compare(graph, target=target, feeds=feeds)
            except Exception as exc:  # report and keep going: one failing target is a finding
                rows.append((label, target, "-", "-", "-", f"failed: {exc}"[:300].replace("|", "/"), "-", "-"))
                continue
            wall = time.perf_counter() - start
            outs = [t for t in result.tensors if t.tensor in graph.output_names]
            first, nf = result.first_divergent, result.first_nonfinite
            rows.append((label, target, providers, len(result.tensors),
                         f"{max(t.metrics.get('rel_l2', float('nan')) for t in outs):.2e}" if outs else "-",
                         first.node if first else "-", nf.node if nf else "-", f"{wall:.1f}"))
    header = ("model", "target", "provider", "tensors", "worst output rel_l2", "first divergent", "first non-finite", "wall s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else TARGETS)
