"""Graph passes: decomposed LayerNorm -> LayerNormalization, verified against the original."""

from __future__ import annotations

import numpy as np

from aligner import compare
from aligner.cli.main import main
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import evaluate_detector
from aligner.examples import shapes_adapter, shapes_detector_path, shapes_preprocess, shapes_val, tiny_vit
from aligner.graph.model import ModelGraph
from aligner.passes import fuse_layernorm


def test_layernorm_fusion_keeps_fp32_outputs_and_removes_the_fp16_overflow(vit_inputs):
    graph = ModelGraph(tiny_vit())
    result = fuse_layernorm(graph)
    fused = ModelGraph(result.model)
    assert len(result.fused) == 5 and fused.op_histogram()["LayerNormalization"] == 5 and "Pow" not in fused.op_histogram()
    assert fused.opset >= 17
    same = compare(graph, target="ort:cpu:fp32", target_model=fused, feeds=vit_inputs, tensors=graph.output_names)
    assert same.first_divergent is None  # FP32 semantics unchanged
    before = compare(graph, target="emu:fp16", feeds=vit_inputs, tensors=graph.output_names).tensors[0].metrics["rel_l2"]
    after = compare(fused, target="emu:fp16", feeds=vit_inputs, tensors=fused.output_names).tensors[0].metrics["rel_l2"]
    assert before > 0.5 and after < 2e-3  # the statistics are computed in FP32 inside the op


def test_fused_example_detector_keeps_its_map_in_pure_fp16():
    graph = ModelGraph.load(shapes_detector_path())
    fused = ModelGraph(fuse_layernorm(graph).model)
    dataset = CocoDataset(*shapes_val(), limit=100)
    result = evaluate_detector(fused, dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32", "emu:fp16"], batch=50)
    fp32, fp16 = result["ort:cpu:fp32"].stats["AP"], result["emu:fp16"].stats["AP"]
    assert fp16 >= fp32 - 0.005  # no plan needed once the LayerNorms are fused


def test_patterns_whose_intermediates_are_read_elsewhere_are_left_alone():
    from onnx import helper

    model = tiny_vit()
    sub = next(n for n in model.graph.node if n.name == "/blocks.0/norm1/Sub")
    model.graph.output.append(helper.make_empty_tensor_value_info(sub.output[0]))  # someone reads the deviation
    result = fuse_layernorm(ModelGraph(model))
    assert len(result.fused) == 4 and any("/blocks.0/norm1/Pow" in s for s in result.skipped)


def test_build_fuse_cli(tmp_path, vit_path, vit_inputs, capsys):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    out = tmp_path / "vit.fused.fp16.onnx"
    assert main(["build", str(vit_path), "--fuse", "layernorm", "--target", "ort:cpu:fp16", "--inputs", str(tmp_path / "in.npz"),
                 "-o", str(out)]) == 0  # pure FP16 now passes the check that refused it unfused
    assert "5 pattern(s) replaced" in capsys.readouterr().out and out.exists()
    assert main(["build", str(vit_path), "--fuse", "softmax", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "available: layernorm" in capsys.readouterr().err
