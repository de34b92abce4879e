"""aligner bisect on real architectures with faults whose location is known."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aligner.graph.model import ModelGraph
from aligner.backends import reference_runner
from aligner.inputs import load_inputs, make_inputs
from aligner.search import bisect, bisect_cuts, frontier, spans
from aligner.compare import compare
from conftest import _export, build_cnn, build_deep_mlp, build_detector, export_detr
from aligner.examples.faults import change_attribute, change_gather_index, edit_constant, scale_weight

STRATEGIES = ("all", "frontier", "isolate")


# ---- the search itself, over a predicate ------------------------------------------------------

def test_bisect_cuts_finds_the_transition_in_log2_calls():
    calls = []

    def diverges(k):
        calls.append(k)
        return k > 700

    assert bisect_cuts(1000, diverges) == 700  # node 700 is the first whose output diverges
    assert len(calls) <= math.ceil(math.log2(1000)) + 1


def test_bisect_cuts_with_a_masked_error_still_lands_on_a_real_transition():
    masked = lambda k: 300 < k <= 400 or k > 800  # noqa: E731  (an error that a later node hides, then a second one)
    j = bisect_cuts(1000, masked)
    assert not masked(j) and masked(j + 1)


def test_no_divergence_at_the_outputs_costs_one_call():
    calls = []
    assert bisect_cuts(50, lambda k: calls.append(k) or False) is None
    assert calls == [50]


def test_frontier_holds_what_crosses_the_cut():
    order = [(["x"], ["a"]), (["a"], ["b"]), (["a", "b"], ["c"]), (["c"], ["y"])]
    lives = spans(order, ["y"])
    assert frontier(lives, 1) == ["a"]
    assert sorted(frontier(lives, 2)) == ["a", "b"]
    assert frontier(lives, 3) == ["c"]
    assert frontier(lives, 4) == ["y"]


# ---- fault injection: 3 architectures x 3 fault kinds -------------------------------------------

@pytest.fixture(scope="session")
def models(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("bisect")
    return {
        "detr": export_detr("legacy", d),
        "detr-dynamo": export_detr("dynamo", d),
        "cnn": _export(build_cnn(), (torch.randn(1, 3, 32, 32),), d / "cnn.onnx", dynamo=False),
        "detector": _export(build_detector(), (torch.randn(1, 3, 64, 64),), d / "det.onnx", dynamo=False),
    }


def _conv_weight_edit(path, out):
    graph = ModelGraph.load(path)
    victim = [n for n in graph.nodes if n.op_type == "Conv"][2].name

    def bump(w):  # every weight of output channel 0: one input channel may be all zeros after a ReLU
        w = w.copy()
        w[0] += 0.1
        return w

    return edit_constant(path, out, victim, 1, bump), victim


def _stride_edit(path, out):
    graph = ModelGraph.load(path)
    victim = next(n.name for n in graph.nodes if n.op_type == "Mul" and "stride" in n.input)
    return edit_constant(path, out, victim, 1, lambda v: v / 2), victim


FAULTS = {
    # (architecture, fault kind): (source model, how to inject) -> (model, target_model, target, victim)
    ("detr", "constant"): ("detr", lambda p, o: ("graph", *change_gather_index(p, o.parent))),
    ("detr", "attribute"): ("detr-dynamo", lambda p, o: ("graph", *change_attribute(p, o, "LayerNormalization", "epsilon", 1.0, which=3))),
    ("detr", "fp16-overflow"): ("detr", lambda p, o: ("fp16", *scale_weight(p, o, "MatMul", 1e6, which=20))),
    ("cnn", "constant"): ("cnn", lambda p, o: ("graph", *_conv_weight_edit(p, o))),
    ("cnn", "attribute"): ("cnn", lambda p, o: ("graph", *change_attribute(p, o, "Resize", "mode", "linear"))),
    ("cnn", "fp16-overflow"): ("cnn", lambda p, o: ("fp16", *scale_weight(p, o, "Conv", 1e6, which=3))),
    ("detector", "constant"): ("detector", lambda p, o: ("graph", *_stride_edit(p, o))),
    ("detector", "attribute"): ("detector", lambda p, o: ("graph", *change_attribute(p, o, "TopK", "largest", 0))),
    ("detector", "fp16-overflow"): ("detector", lambda p, o: ("fp16", *scale_weight(p, o, "Conv", 1e6, which=1))),
}


@pytest.mark.parametrize("case", list(FAULTS), ids=[f"{a}-{f}" for a, f in FAULTS])
def test_every_strategy_names_the_injected_node(case, models, tmp_path):
    source, inject = FAULTS[case]
    kind, faulty, victim = inject(models[source], tmp_path / "faulty.onnx")
    if kind == "graph":  # an edited copy, compared on the same runtime
        run = dict(model=models[source], target="ort:cpu:fp32", target_model=faulty)
    else:  # scaled weights: the FP16 build overflows where FP32 does not
        run = dict(model=faulty, target="emu:fp16")
        graph = ModelGraph.load(faulty)
        out = graph.node(victim).output[0]
        assert np.abs(reference_runner(graph).run(make_inputs(graph), [out])[out]).max() > 65504  # the fault is real
    verdicts = {s: bisect(**run, strategy=s) for s in STRATEGIES}
    for strategy, result in verdicts.items():
        assert result.root_cause is not None, strategy
        assert result.root_cause.node == victim, (strategy, result.explanation)
        expected = "nonfinite" if kind == "fp16" else "local"
        assert result.root_cause.kind == expected, (strategy, result.root_cause)
    for strategy in ("all", "frontier"):
        assert verdicts[strategy].first_divergent.node == victim
    frontier_run = verdicts["frontier"]
    searching = [p for p in frontier_run.probes if p.phase in ("outputs", "frontier")]
    assert len(searching) <= math.ceil(math.log2(frontier_run.nodes)) + 1  # the halving itself
    # the sweep for masked divergences before the transition rides along in the halving runs: within the run bound
    runs = frontier_run.to_dict()["runs"]
    assert runs["halving"] + runs.get("sweep", 0) <= math.ceil(math.log2(frontier_run.nodes)) + 2, frontier_run.checked
    assert "sweep run" in frontier_run.checked
    # each cut's own verdict still rests on the tensors crossing it, a handful
    assert all(p.tensors - p.swept <= max(4, frontier_run.nodes // 10) for p in frontier_run.probes if p.phase == "frontier")
    if kind == "fp16":
        assert verdicts["all"].nonfinite_origin.node == victim
        assert "65504" in verdicts["all"].root_cause.reason


def test_edited_graph_verdict_says_what_changed(models, tmp_path):
    edited, victim = change_attribute(models["cnn"], tmp_path / "linear.onnx", "Resize", "mode", "linear")
    result = bisect(models["cnn"], target="ort:cpu:fp32", target_model=edited)
    assert "'mode'" in result.root_cause.reason and "linear" in result.root_cause.reason


# ---- honest verdicts --------------------------------------------------------------------------

def test_gradual_fp16_error_has_no_false_local_root_cause(tmp_path):
    import torch

    path = _export(build_deep_mlp(), (torch.randn(4, 64),), tmp_path / "mlp.onnx", dynamo=False)
    for strategy in ("auto", "frontier"):
        result = bisect(path, target="emu:fp16", strategy=strategy)
        assert result.first_divergent is not None  # the error does pass the tolerance...
        assert result.root_cause.kind == "inherited"  # ...but no node is blamed for it
        assert result.local_errors and not any(e.diverges for e in result.local_errors)
        assert result.local_errors[0].metrics["rel_l2"] >= result.local_errors[-1].metrics["rel_l2"]
        assert "built up" in result.root_cause.reason


def _near_tie_topk() -> onnx.ModelProto:
    """Scores 1000 + 0.01*i: distinct in FP32, ties in FP16 (spacing 0.5 there)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["scores"], name="scale"),
        helper.make_node("TopK", ["scores", "k"], ["values", "indices"], name="topk", axis=1),
        helper.make_node("Cast", ["indices"], ["picked"], name="as_float", to=TensorProto.FLOAT),
    ]
    init = [onnx.numpy_helper.from_array(np.ones((1, 64), np.float32), "one"),
            onnx.numpy_helper.from_array(np.array([8], np.int64), "k")]
    outs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, None), helper.make_tensor_value_info("picked", TensorProto.FLOAT, None)]
    return helper.make_model(helper.make_graph(nodes, "ties", [x], outs, init), opset_imports=[helper.make_opsetid("", 17)])


def test_flipped_topk_is_discrete_not_blamed_on_its_consumers():
    feeds = {"x": (1000 + 0.01 * np.random.default_rng(0).permutation(64)).astype(np.float32)[None]}
    result = bisect(ModelGraph(_near_tie_topk()), target="emu:fp16", feeds=feeds)
    assert result.first_divergent.node == "topk"
    assert result.root_cause.kind == "discrete"


def test_target_failure_is_reported_not_counted_as_divergence(vit_path, vit_inputs):
    result = bisect(vit_path, target="ort:cpu:bf16", feeds=vit_inputs)  # ORT CPU has no BF16 Add kernel
    assert result.failed and "Add" in result.failed
    assert result.first_divergent is None and result.root_cause is None
    assert result.probes[-1].status == "failed" and result.probes[-1].diverged is None


# ---- repro ------------------------------------------------------------------------------------

def test_repro_reproduces_on_its_own(vit_path, vit_inputs, tmp_path):
    result = bisect(vit_path, target="emu:fp16", feeds=vit_inputs, save_repro=tmp_path / "repro")
    assert result.repro.reproduces and result.repro.nodes == ("/blocks.0/norm1/Pow",)
    piece = ModelGraph.load(result.repro.model)  # a standalone, checker-valid model...
    assert len(piece.nodes) <= 2
    again = compare(piece, target="emu:fp16", feeds=load_inputs(result.repro.inputs)[0])
    assert again.first_nonfinite is not None  # ...that overflows by itself


def test_repro_of_an_edited_graph_carries_both_versions(models, tmp_path):
    edited, victim = _stride_edit(models["detector"], tmp_path / "stride.onnx")
    result = bisect(models["detector"], target="ort:cpu:fp32", target_model=edited, save_repro=tmp_path / "repro")
    assert result.repro.reproduces and result.repro.reference_model
    again = compare(result.repro.reference_model, target="ort:cpu:fp32", target_model=result.repro.model,
                    feeds=load_inputs(result.repro.inputs)[0])
    assert again.first_divergent.node == victim


def test_repro_folder_is_not_overwritten_without_force(vit_path, vit_inputs, tmp_path):
    from aligner.errors import InputError

    (tmp_path / "repro").mkdir()
    (tmp_path / "repro" / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="--force"):
        bisect(vit_path, feeds=vit_inputs, save_repro=tmp_path / "repro")
