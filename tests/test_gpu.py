"""GPU tests: run on the GPU machine (onnxruntime-gpu, TensorRT-RTX staged); skipped elsewhere.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx python -m pytest -q -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import importlib.util

import onnxruntime as ort
import pytest

from aligner import compare
from aligner.bench import bench
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
RTX = importlib.util.find_spec("tensorrt_rtx") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="no ONNX Runtime CUDA provider (GPU machine only)")]


def test_real_fp16_overflows_where_the_emulator_says(vit_path, vit_inputs):
    """As written (graph optimizations off) the GPU overflows where the plain emulator does; as
    deployed ORT fuses the LayerNorm and computes its Pow inside an FP32 kernel: no overflow, and
    the emulator with ORT's fusions says the same (measured on the H200: logits rel_l2 4e-4 both)."""
    written = compare(vit_path, target="ort:cuda:fp16@capture=all,graph_optimization_level=disable_all", feeds=vit_inputs)
    emu = compare(vit_path, target="emu:fp16", feeds=vit_inputs)
    assert written.first_nonfinite.node == emu.first_nonfinite.node == "/blocks.0/norm1/Pow"
    deployed = compare(vit_path, target="ort:cuda:fp16", feeds=vit_inputs)
    fused = compare(vit_path, target="emu:fp16@fusions=ort", feeds=vit_inputs)
    assert deployed.first_nonfinite is None and fused.first_nonfinite is None and deployed.first_divergent is None


def test_tf32_is_explicit(vit_path, vit_inputs):
    fp32 = compare(vit_path, target="ort:cuda:fp32", tensors=["logits"], feeds=vit_inputs).tensors[0].metrics["rel_l2"]
    tf32 = compare(vit_path, target="ort:cuda:tf32", tensors=["logits"], feeds=vit_inputs).tensors[0].metrics["rel_l2"]
    assert fp32 < 1e-5 < tf32


def test_bench_on_cuda_reports_latency_and_memory():
    result = bench(shapes_detector_path(), ["ort:cuda:fp16"], [1, 8], runs=20, warmup=5)
    assert [r.batch for r in result.rows] == [1, 8] and all(r.gpu_memory_mb for r in result.rows)
    assert "H" in result.device or "NVIDIA" in result.device


@pytest.mark.skipif(not RTX, reason="TensorRT-RTX not staged")
def test_rtx_builds_but_refuses_to_run_on_cc_9(monkeypatch):
    monkeypatch.setenv("ALIGNER_TENSORRT", "tensorrt_rtx")
    from aligner.backends.trt.engine import build_engine, load_tensorrt

    engine = build_engine(ModelGraph.load(shapes_detector_path()), "fp16", ["/stem_norm/Pow"], {"pixels": (1, 3, 128, 128)},
                          mark=["/stem_norm/Pow_output_0"])
    assert engine.module == "tensorrt_rtx" and len(engine.data) > 1e6 and "/stem_norm/Pow_output_0" in engine.outputs
    from aligner.backends.trt.runner import CollectingLogger

    trt = load_tensorrt()
    logger = CollectingLogger(trt)
    assert trt.Runtime(logger).deserialize_cuda_engine(engine.data) is None
    assert any("compute capability 9.0" in m for m in logger.messages)  # exactly the refusal we expect; nothing else fails


@pytest.mark.skipif(not RTX, reason="TensorRT-RTX not staged")
def test_trt_targets_in_compare_bisect_and_bench_fail_as_target_failures_on_cc_9(monkeypatch, tmp_path, capsys):
    """The trt:* runner builds (capture tensors marked) and then meets the refusal to load on CC 9.0:
    compare and bisect report a failed target (exit 3), never a divergence; the legacy per-layer
    precision path says TensorRT-RTX has no such flags."""
    monkeypatch.setenv("ALIGNER_TENSORRT", "tensorrt_rtx")
    from aligner.backends.trt.engine import build_engine
    from aligner.cli.main import main
    from aligner.errors import TargetError, TargetRunError
    from aligner.search.bisect import bisect

    model = str(shapes_detector_path())
    assert main(["compare", model, "--target", "trt:fp16", "--input-shapes", "pixels:1x3x128x128"]) == 3
    err = capsys.readouterr().err
    assert "compute capability 9.0" in err and "refused to load the engine" in err
    result = bisect(model, target="trt:fp16")
    assert result.failed and "compute capability 9.0" in result.failed and result.probes[0].status == "failed"  # no strategy ran
    with pytest.raises(TargetRunError, match="compute capability 9.0"):
        bench(model, ["trt:fp16"], [1], runs=5, warmup=1)
    with pytest.raises(TargetError, match="no per-layer precision flags"):
        build_engine(ModelGraph.load(model), "fp16", ["/stem_norm/Pow"], {"pixels": (1, 3, 128, 128)}, layer_precision=True)


def _int8_fault(tmp_path):
    import numpy as np
    import onnx
    from test_int8 import _image, build_cnn_int8

    (tmp_path / "calib").mkdir()
    for i in range(8):
        np.savez(tmp_path / "calib" / f"{i}.npz", **_image(100 + i))
    onnx.save(build_cnn_int8(True), str(tmp_path / "fault.onnx"))
    return ModelGraph.load(tmp_path / "fault.onnx"), str(tmp_path / "calib"), _image(7)


def test_int8_on_cuda_names_the_outlier_consumer_and_its_plan_passes(tmp_path):
    """ort:cuda:int8: the QDQ model on the CUDA provider (Q/DQ kernels, float compute between them)."""
    from test_int8 import CONSUMER, OUTLIER_CONV

    from aligner.backends.target import Target
    from aligner.search.bisect import bisect

    graph, calib, x = _int8_fault(tmp_path)
    target = Target.parse("ort:cuda:int8").with_options({"calib": calib})
    verdict = bisect(graph, target=target, feeds=x, strategy="isolate")
    own = {e.node: e for e in verdict.local_errors}
    assert own[CONSUMER].diverges and not own[OUTLIER_CONV].diverges
    planned = compare(graph, target=target.with_pins([OUTLIER_CONV, CONSUMER]), feeds=x, tensors=graph.output_names)
    assert planned.first_divergent is None


@pytest.mark.skipif(not RTX, reason="TensorRT-RTX not staged")
def test_trt_int8_engine_builds_from_the_qdq_model(tmp_path, monkeypatch):
    from test_int8 import CONSUMER, OUTLIER_CONV

    from aligner.backends.target import Target
    from aligner.build import build

    monkeypatch.setenv("ALIGNER_TENSORRT", "tensorrt_rtx")
    graph, calib, x = _int8_fault(tmp_path)
    target = Target.parse(f"trt:int8+fp32={OUTLIER_CONV},{CONSUMER}@fallback=fp16").with_options({"calib": calib})
    result = build(graph, target, tmp_path / "fault.engine", check_inputs=x)
    assert result.written and result.engine["bytes"] > 0 and result.check.on == "emu:int8" and result.check.passed
