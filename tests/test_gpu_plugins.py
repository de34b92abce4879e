"""Plugin kernels (Triton, what the TensorRT plugin launches) against the NumPy references, on a
CUDA GPU; and TensorRT-RTX's refusal of plugin layers. Skipped where there is no CUDA GPU.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx python -m pytest -q -m gpu tests/test_gpu_plugins.py
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from aligner.plugin import get


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU with torch and triton (GPU machine only)")]
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}  # relative to the largest output; storage rounding only


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
def test_masked_softmax_kernel_matches_the_reference(storage):
    import torch

    from aligner_plugins.masked_softmax.kernel import launch

    rng = np.random.default_rng(0)
    scores = (rng.normal(size=(2, 4, 30, 300)) * 4).astype(np.float32)
    keep = np.ones((2, 1, 1, 300), bool)
    keep[0, ..., 250:] = False
    keep[1] = False  # fully masked rows
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[storage]
    s, k = torch.tensor(scores, device="cuda").to(dtype), torch.tensor(keep, device="cuda")
    out = torch.empty_like(s)
    spec = get("MaskedSoftmax")
    launch([s, k], [out], spec.attributes)
    got = out.float().cpu().numpy()
    ref = spec.run_reference(s.float().cpu().numpy(), keep)[0]
    assert np.isfinite(got).all() and np.abs(got - ref).max() <= TOL[storage] * np.abs(ref).max()
    assert np.allclose(got[1], 1 / 300, rtol=TOL[storage])  # fully masked rows: uniform, as in the FP32 original


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
@pytest.mark.parametrize("mode,aligned,sampling", [("avg", 1, 0), ("avg", 0, 2), ("max", 1, 2)])
def test_roi_align_kernel_matches_the_reference(storage, mode, aligned, sampling):
    import torch

    from aligner_plugins.roi_align.kernel import launch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 32, 25, 34)).astype(np.float32)
    xy = rng.uniform(-20, 250, size=(64, 2))
    rois = np.concatenate([xy, xy + rng.uniform(1, 150, size=(64, 2))], 1).astype(np.float32)
    idx = rng.integers(0, 2, 64).astype(np.int64)
    spec = get("RoIAlign")
    attrs = {**spec.attributes, "output_height": 7, "output_width": 5, "spatial_scale": 1 / 8, "mode": mode, "aligned": aligned,
             "sampling_ratio": sampling}
    dtype = torch.float32 if storage == "fp32" else torch.float16
    X = torch.tensor(x, device="cuda").to(dtype)
    out = torch.empty((64, 32, 7, 5), device="cuda", dtype=dtype)
    launch([X, torch.tensor(rois, device="cuda"), torch.tensor(idx, device="cuda")], [out], attrs)
    got = out.float().cpu().numpy()
    ref = spec.run_reference(X.float().cpu().numpy(), rois, idx, **attrs)[0]
    assert np.abs(got - ref).max() <= TOL[storage] * np.abs(ref).max()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX not staged")
def test_tensorrt_rtx_refuses_plugin_models_with_a_clear_error(monkeypatch):
    from onnx import TensorProto, helper

    from aligner.backends.trt.engine import build_engine
    from aligner.errors import TargetError
    from aligner.graph.model import ModelGraph
    from aligner.plugin import DOMAIN

    monkeypatch.setenv("ALIGNER_TENSORRT", "tensorrt_rtx")
    node = get("MaskedSoftmax").make_node(["s", "keep"], ["p"], name="attn/MaskedSoftmax")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4, 12]),
                                            helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 12])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 4, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=8)
    with pytest.raises(TargetError, match="add_plugin_v3"):  # instead of the parser aborting the process
        build_engine(ModelGraph(model), "fp16")
