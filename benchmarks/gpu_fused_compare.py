"""The fused DETR (LayerNorms -> LayerNormalization, masked softmaxes -> aligner::MaskedSoftmax)
against the original on ONNX Runtime CUDA, FP32 and FP16: the issue's

    aligner compare model.onnx --target-model model.fused.onnx --target ort:cuda:fp16

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_fused_compare.py

(needs onnxruntime-extensions for the plugin op, which runs on the CPU beside the CUDA provider).
"""

import sys
from pathlib import Path

import onnx
from _work import work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.cli.main import main  # noqa: E402
from aligner.examples.testmodels import export_detr_with_mask  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402
from aligner.passes import fuse_layernorm, fuse_masked_softmax  # noqa: E402

work = work_dir("fused-compare-")
path, feeds = export_detr_with_mask(work / "detr.onnx")
fused = fuse_masked_softmax(ModelGraph(fuse_layernorm(ModelGraph.load(path)).model)).model
onnx.save(fused, str(work / "detr.fused.onnx"))
import numpy as np  # noqa: E402

np.savez(work / "in.npz", **feeds)
for target in ("ort:cuda:fp32", "ort:cuda:fp16"):
    print(f"\n$ aligner compare detr.onnx --target-model detr.fused.onnx --target {target} --inputs in.npz", flush=True)
    print("exit", main(["compare", str(path), "--target-model", str(work / "detr.fused.onnx"), "--target", target, "--inputs", str(work / "in.npz")]))
    print(f"\n$ aligner compare detr.onnx --target {target} --inputs in.npz   (the original, for scale)", flush=True)
    print("exit", main(["compare", str(path), "--target", target, "--inputs", str(work / "in.npz")]))
