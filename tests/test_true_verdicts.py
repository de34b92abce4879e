"""True verdicts: a capture that cannot change the answer does not silence it.

Each case has a known fault on a runtime that fuses, where capturing a tensor stops a fusion and
moves the outputs a little: compare and every bisect strategy must still name the edited node, and a
capture that really changes what the target computes (a fused FP16 LayerNorm that overflows once
unfused) must still be labelled, not blamed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from aligner import bisect, compare
from aligner.cli.main import main
from aligner.examples import example_inputs, tiny_vit
from aligner.examples.fused_faults import conv_bn_net, masked_decoder, near_uniform_queries, scale_initializer
from aligner.graph.model import ModelGraph

STRATEGIES = ["all", "frontier", "isolate", "auto"]


@pytest.fixture(scope="module")
def folded_conv():
    """ORT CPU FP32 folds every BatchNormalization into its Conv; /conv4/Conv's first filter is edited by 1.3x."""
    model = conv_bn_net()
    return ModelGraph(model), ModelGraph(scale_initializer(model, "w4", 1.3))


@pytest.fixture(scope="module")
def masked():
    """The DETR decoder whose layer-2 self-attention scale was multiplied by 1.5 (outputs move ~4e-7)."""
    return ModelGraph(masked_decoder()), ModelGraph(masked_decoder(scale_factor=1.5)), near_uniform_queries()


def test_capturing_a_folded_conv_moves_the_outputs_yet_the_edited_conv_is_named(folded_conv):
    graph, edited = folded_conv
    result = compare(graph, target="ort:cpu:fp32", target_model=edited)
    first = result.first_divergent
    assert first is not None and first.node == "/conv4/Conv", result.verdict()
    assert not result.perturbed  # a lost FP32 fold moves the outputs by ~1e-6: far inside the 1e-4 tolerance
    assert all(t.perturbed == "" for t in result.tensors[:first.index])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_bisect_strategy_names_the_edited_conv_folded_into_its_batchnorm(folded_conv, strategy):
    graph, edited = folded_conv
    result = bisect(graph, target="ort:cpu:fp32", target_model=edited, strategy=strategy)
    assert result.first_divergent.node == "/conv4/Conv", result.explanation
    assert result.root_cause.node == "/conv4/Conv" and result.root_cause.kind == "local"
    assert not any(p.perturbed for p in result.probes)


def test_a_masked_attention_scale_edit_is_named_though_the_outputs_barely_move(masked):
    graph, edited, feeds = masked
    result = compare(graph, target="ort:cpu:fp32", target_model=edited, feeds=feeds)
    assert result.first_divergent is not None, result.verdict()
    assert result.first_divergent.node == "/decoder/layers.2/self_attn/Mul"
    assert result.first_divergent.metrics["rel_l2"] > 0.1  # the edited Mul's own output moves by about half
    outputs = [t for t in result.tensors if t.tensor == "y"]
    assert outputs and not outputs[0].diverges  # ...while the outputs stay within the FP32 tolerance
    assert "No divergence" not in result.verdict()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_bisect_strategy_names_the_masked_attention_edit(masked, strategy):
    graph, edited, feeds = masked
    result = bisect(graph, target="ort:cpu:fp32", target_model=edited, feeds=feeds, strategy=strategy)
    assert result.diverged and result.first_divergent.node == "/decoder/layers.2/self_attn/Mul", result.explanation


@pytest.mark.parametrize("spec", ["emu:fp16@fusions=ort", "emu:fp16@fusions=ort,capture=all"])
def test_the_fp16_emulator_with_fusions_names_the_masked_edit_in_every_strategy(spec):
    """The GPU-style case on CPU: the FP16 emulator applying ONNX Runtime's fusions (the attention scale
    folds into a FusedMatMul); captured at the kernels' boundaries or everywhere, the edit is named."""
    kw = dict(tokens=32, dim=64)
    graph, edited, feeds = ModelGraph(masked_decoder(**kw)), ModelGraph(masked_decoder(scale_factor=1.5, **kw)), near_uniform_queries(**kw)
    named = compare(graph, target=spec, target_model=edited, feeds=feeds).first_divergent
    assert named is not None and named.node == "/decoder/layers.2/self_attn/Mul"
    for strategy in STRATEGIES:
        result = bisect(graph, target=spec, target_model=edited, feeds=feeds, strategy=strategy)
        assert result.first_divergent.node == named.node, (strategy, result.explanation)


def test_a_capture_that_unfuses_an_overflowing_layernorm_is_still_labelled_not_blamed():
    """capture=all on the fusing FP16 emulator: capturing inside the fused LayerNorm makes its Pow
    overflow and the logits move by rel_l2 ~0.8 — a perturbation far beyond the tolerance. Reported, never blamed."""
    graph, feeds = ModelGraph(tiny_vit()), example_inputs()
    probed = compare(graph, target="emu:fp16@fusions=ort,capture=all", feeds=feeds)
    assert probed.first_divergent is None, probed.verdict()
    pow_row = next(t for t in probed.tensors if t.tensor == "/blocks.0/norm1/Pow_output_0")
    assert pow_row.diverges and pow_row.new_nonfinite and "output 'logits' moved" in pow_row.perturbed
    assert pow_row.capture_effect > probed.tolerance.threshold
    for strategy in ("all", "frontier"):
        result = bisect(graph, target="emu:fp16@fusions=ort,capture=all", feeds=feeds, strategy=strategy)
        assert result.first_divergent is None, (strategy, result.explanation)


def test_the_cli_names_the_edited_conv_and_records_what_the_capture_did(folded_conv, tmp_path):
    graph, edited = folded_conv
    ref, tgt = tmp_path / "ref.onnx", tmp_path / "edited.onnx"
    onnx.save(graph.model, ref)
    onnx.save(edited.model, tgt)
    code = main(["compare", str(ref), "--target-model", str(tgt), "--json", str(tmp_path / "diff.json")])
    assert code == 1
    data = json.loads((tmp_path / "diff.json").read_text())
    assert data["summary"]["first_divergent"]["node"] == "/conv4/Conv" and data["perturbed"] == []
    rows = {t["tensor"]: t for t in data["tensors"]}
    assert "capture_effect" in rows["c4"] and np.isfinite(rows["c4"]["capture_effect"])
    code = main(["bisect", str(ref), "--target-model", str(tgt), "--strategy", "frontier", "--json", str(tmp_path / "bisect.json")])
    assert code == 1
    assert json.loads((tmp_path / "bisect.json").read_text())["first_divergent"]["node"] == "/conv4/Conv"


@pytest.mark.parametrize("strategy", ["compare", "all", "frontier"])
def test_a_capture_that_moves_the_outputs_never_silences_outputs_that_diverge(strategy):
    """capture=all on the fusing FP16 emulator labels every intermediate tensor (capturing them unfuses the
    LayerNorms), but the graph outputs are judged on the uncaptured run: a tripled head weight is DIVERGED."""
    graph, feeds = ModelGraph(tiny_vit()), example_inputs()
    edited = ModelGraph(scale_initializer(graph.model, "head.weight", 3.0, channel=None))
    spec = "emu:fp16@fusions=ort,capture=all"
    if strategy == "compare":
        result = compare(graph, target=spec, target_model=edited, feeds=feeds)
        first, diverged = result.first_divergent, result.first_divergent is not None
        assert result.perturbed and "labelled, not blamed" in result.verdict()  # said, not hidden
    else:
        result = bisect(graph, target=spec, target_model=edited, feeds=feeds, strategy=strategy)
        first, diverged = result.first_divergent, result.diverged
    assert diverged and first.tensor == "logits" and not first.perturbed


def test_a_root_cause_in_a_parameter_names_the_parameter():
    """PP-OCR's detector: a BatchNormalization's running variance of 9.79e7 is inf in FP16. bisect names the
    parameter and its value, not "its own arithmetic in FP16"."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    w[2] *= 1e4  # a channel of large activations, normalised by its large variance in FP32
    var = (0.5 + rng.random(8)).astype(np.float32)
    var[2] = 9.79e7
    inits = [nh.from_array(w, "conv.w"), nh.from_array(np.ones(8, np.float32), "bn.s"), nh.from_array(np.zeros(8, np.float32), "bn.b"),
             nh.from_array(np.zeros(8, np.float32), "bn.m"), nh.from_array(var, "batch_norm_0.w_2")]
    nodes = [helper.make_node("Conv", ["x", "conv.w"], ["c"], name="p2o.Conv.0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "batch_norm_0.w_2"], ["n"], name="p2o.BatchNormalization.1"),
             helper.make_node("Relu", ["n"], ["y"], name="p2o.Relu.2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    for strategy in ("all", "frontier"):
        cause = bisect(model, target="emu:fp16", strategy=strategy).root_cause
        assert cause.node == "p2o.BatchNormalization.1"
        assert "'batch_norm_0.w_2'" in cause.reason and "9.79e+07" in cause.reason and "inf once stored in FP16" in cause.reason


def test_a_passing_plan_says_what_still_diverges_inside():
    """The tiny ViT on emu:fp16: its first LayerNorm overflows (inf) but a later LayerNorm masks it, so the
    outputs pass with the final norm pinned alone; the plan says where NaN/inf remain, as compare of it would."""
    from aligner.search.precision import search_precision

    graph, feeds = ModelGraph(tiny_vit()), example_inputs()
    plan = search_precision(graph, target="emu:fp16", samples=[feeds], fusion_check=False)
    assert plan.passed
    with_plan = compare(graph, target=f"emu:fp16+fp32={','.join(plan.fp32_nodes)}" if plan.fp32_nodes else "emu:fp16", feeds=feeds)
    assert with_plan.first_nonfinite is not None  # compare of the plan exits 1 ...
    assert str(len(with_plan.diverging)) in plan.inside and with_plan.first_nonfinite.node in plan.inside  # ... and the plan says so
    assert plan.to_dict()["inside"] == plan.inside
