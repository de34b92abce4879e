"""aligner build: the deployable mixed model of a plan, checked before it is written."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx

from aligner.cli.main import main


def test_build_refuses_a_diverging_model_and_writes_the_planned_one(vit_path, vit_inputs, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    plan = tmp_path / "plan.json"
    assert main(["precision", str(vit_path), "--inputs", str(tmp_path / "in.npz"), "--out", str(plan)]) == 0
    out = tmp_path / "vit.fp16.onnx"
    assert main(["build", str(vit_path), "--inputs", str(tmp_path / "in.npz"), "-o", str(out)]) == 1  # pure FP16 overflows
    assert not out.exists() and "not written" in capsys.readouterr().out
    assert main(["build", str(vit_path), "--inputs", str(tmp_path / "in.npz"), "--plan", str(plan), "-o", str(out)]) == 0
    model = onnx.load(str(out))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert any(n.op_type == "Cast" for n in model.graph.node)
    assert main(["build", str(vit_path), "--plan", str(plan), "-o", str(out)]) == 2  # never overwrite without --force
    optimized = tmp_path / "vit.fp16.ort.onnx"
    assert main(["build", str(vit_path), "--target", "ort:cpu:fp16", "--inputs", str(tmp_path / "in.npz"), "--plan", str(plan),
                 "-o", str(tmp_path / "vit.cpu.onnx"), "--ort-optimized", str(optimized)]) == 0
    assert optimized.exists() and onnx.load(str(optimized)).graph.node  # ORT's own optimized graph, loadable
    capsys.readouterr()
    code = main(["build", str(vit_path), "--target", "trt:fp16", "-o", str(tmp_path / "m.engine")])
    if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
        assert code == 2 and "pip install 'aligner[tensorrt]'" in capsys.readouterr().err  # no TensorRT on this machine


def test_trt_targets_parse_everywhere_and_say_what_to_install_where_tensorrt_is_missing(vit_path, capsys):
    from aligner.backends import parse_target

    assert str(parse_target("trt:fp16")) == "trt:fp16" and parse_target("trt").precision == "fp16"
    assert parse_target("trt:cuda:bf16").device == "cuda"
    if importlib.util.find_spec("tensorrt") is not None or importlib.util.find_spec("tensorrt_rtx") is not None:
        return  # the GPU machine: tests/test_gpu.py covers the trt:* runner there
    for argv in (["compare", str(vit_path), "--target", "trt:fp16"], ["bisect", str(vit_path), "--target", "trt:fp16"],
                 ["bench", str(vit_path), "--target", "trt:fp16"]):
        assert main(argv) == 2, argv
        assert "pip install 'aligner[tensorrt]'" in capsys.readouterr().err, argv
