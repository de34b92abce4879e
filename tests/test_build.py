"""aligner build: the deployable mixed model of a plan, checked before it is written."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

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


def test_force_overwrites_but_never_skips_the_check_and_write_anyway_records_why(vit_path, vit_inputs, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    out = tmp_path / "vit.fp16.onnx"
    out.write_bytes(b"the user's file")
    base = ["build", str(vit_path), "--target", "ort:cpu:fp16", "--inputs", str(tmp_path / "in.npz"), "-o", str(out)]
    assert main(base + ["--force"]) == 1  # pure FP16 overflows: --force overwrites files, it does not skip the check
    assert out.read_bytes() == b"the user's file" and "not written" in capsys.readouterr().out
    assert main(base + ["--force", "--write-anyway", "--target-option", "intra_op_num_threads=1"]) == 1  # written, still says 1
    assert "written anyway" in capsys.readouterr().out and onnx.load(str(out)).graph.node
    sidecar = json.loads((tmp_path / "vit.fp16.onnx.json").read_text())
    assert sidecar["target"]["spec"] == "ort:cpu:fp16@intra_op_num_threads=1" and sidecar["target"]["options"] == {"intra_op_num_threads": "1"}
    assert sidecar["written"] and not sidecar["check"]["passed"] and sidecar["check"]["diverging"]
    assert sidecar["check"]["tolerance"] == {"metric": "rel_l2", "threshold": 0.02, "atol": 0.001}  # the fp16 rule of every command
    assert main(base + ["--force", "--target-option", "cudnn_conv_algo_search=HEURISTIC"]) == 2
    assert "is a CUDA provider option" in capsys.readouterr().err


def test_the_library_build_returns_what_it_did_and_the_sidecar_says_the_same(vit_path, vit_inputs, tmp_path):
    from aligner import Target, build
    from aligner.errors import InputError
    from aligner.search.precision import search_precision

    plan = search_precision(vit_path, "emu:fp16", samples=[vit_inputs])
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    target = Target.parse("ort:cpu:fp16+plan@graph_optimization_level=extended", plan=tmp_path / "plan.json")
    result = build(vit_path, target, tmp_path / "vit.onnx", check_inputs=vit_inputs, ort_optimized=tmp_path / "vit.ort.onnx")
    assert result.written and result.passed and result.kind == "onnx" and result.target == target
    assert result.pinned == len(plan.fp32_nodes) and result.casts_inserted > 0 and result.check.on == "emu:fp16"
    assert result.check.worst_rel_l2 < result.check.tolerance.threshold
    assert (tmp_path / "vit.ort.onnx").exists() and result.ort_optimized == str(tmp_path / "vit.ort.onnx")
    sidecar = json.loads((tmp_path / "vit.onnx.json").read_text())
    assert sidecar == json.loads(json.dumps(result.to_dict()))
    assert sidecar["target"]["spec"] == str(target) and sidecar["plan"]["fp32_nodes"] == sorted(plan.fp32_nodes)
    with pytest.raises(InputError, match="exists; pass --force"):
        build(vit_path, target, tmp_path / "vit.onnx", check_inputs=vit_inputs)
    fp32 = build(vit_path, "ort:cpu:fp32", tmp_path / "vit.fp32.onnx")
    assert fp32.written and fp32.check is None and fp32.passed  # nothing to check in FP32
    with pytest.raises(InputError, match=r"build writes models for ONNX Runtime \(ort:\*\) or engines \(trt:\*\)"):
        build(vit_path, "emu:fp16", tmp_path / "x.onnx")
