"""Capture in segments: each side runs every node once, and the verdict is the one whole-model
groups give (every tensor, same metrics), on plain and fusing targets."""

import pytest

from aligner import compare, make_runner
from aligner.compare.segments import Cuts, plan_segments
from aligner.compare.layerwise import estimate_sizes
from aligner.examples import example_inputs, tiny_vit
from aligner.graph.model import ModelGraph


@pytest.fixture(scope="module")
def vit():
    return ModelGraph(tiny_vit()), example_inputs()


def _rows(result, exact: bool):
    return {d.tensor: (d.diverges, d.reason, d.kernel) + ((d.metrics.get("rel_l2"),) if exact else ()) for d in result.tensors}


@pytest.mark.parametrize("target", ["emu:fp16", "emu:fp16@fusions=ort", "ort:cpu:fp32"])
def test_segments_give_the_verdict_of_whole_model_groups(vit, target, caplog):
    import logging

    graph, feeds = vit
    with caplog.at_level(logging.INFO, logger="aligner.compare.layerwise"):
        segmented = compare(graph, target=target, feeds=feeds, capture_budget_mb=0.1)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "segment(s), one pass per side" in said and "instead" not in said  # really cut, no fallback
    grouped = compare(graph, target=target, feeds=feeds, capture_budget_mb=0.1, segments=False)
    exact = target.startswith("emu")  # ORT's optimizer may pick other kernels when the graph is cut: FP32 rounding only
    assert _rows(segmented, exact) == _rows(grouped, exact) and len(segmented.tensors) > 40
    assert segmented.verdict() == grouped.verdict()
    if target == "emu:fp16":  # the known overflow is found at the same node
        assert segmented.first_divergent.node == "/blocks.0/norm1/Pow" and segmented.first_divergent.new_nonfinite


def test_segments_cover_every_node_once_and_never_cut_through_a_fused_kernel(vit):
    graph, feeds = vit
    runner = make_runner(graph, "emu:fp16@fusions=ort")
    allowed = runner.capturable
    segments = plan_segments(graph, graph.activations(), estimate_sizes(graph, feeds), 50_000,
                             lambda crossing: all(t in allowed for t in crossing))
    cuts = Cuts(graph)
    assert len(segments) > 3 and segments[0].start == 0 and segments[-1].stop == cuts.n
    assert all(a.stop == b.start for a, b in zip(segments, segments[1:]))
    for s in segments[1:]:  # every tensor crossing a cut is one the deployed graph writes
        assert s.inputs and all(t in allowed for t in s.inputs)


def test_a_graph_output_that_an_fp32_node_also_reads_rewrites_to_a_valid_model():
    """Cutting a model makes intermediate tensors graph outputs; one that a pinned (FP32) node also
    reads needed two casts of the same name (found on Mask R-CNN: 'two nodes with same node name')."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Sqrt", ["r"], ["s"], name="sqrt"),
             helper.make_node("Neg", ["s"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for target in ("ort:cpu:fp16+fp32=sqrt", "emu:fp16+fp32=sqrt"):
        out = make_runner(model, target).run(x)
        assert np.allclose(out["y"], -np.sqrt(x["x"]), rtol=1e-3) and np.allclose(out["r"], x["x"])
    onnx.checker.check_model(onnx.helper.make_model(graph))


@pytest.mark.parametrize("target", ["ort:cpu:fp16@capture=all", "emu:int8"])
def test_targets_whose_segments_would_compute_otherwise_are_not_cut(vit, target):
    """ORT FP16: a segment's FP32 inputs/outputs let its optimizer keep in FP32 what overflows FP16
    in the whole model (the known Pow overflow vanished); INT8: each segment would be quantized anew."""
    graph, feeds = vit
    segmented = compare(graph, target=target, feeds=feeds, capture_budget_mb=0.1)
    grouped = compare(graph, target=target, feeds=feeds, capture_budget_mb=0.1, segments=False)
    assert segmented.verdict() == grouped.verdict()
    assert [d.metrics.get("rel_l2") for d in segmented.tensors] == [d.metrics.get("rel_l2") for d in grouped.tensors]


def test_a_graph_output_written_by_a_constant_does_not_break_segments():
    import numpy as np
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"], name=f"relu{i}") for i in range(6)]
    nodes.append(helper.make_node("Constant", [], ["c"], name="const", value=nh.from_array(np.ones(3, np.float32))))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("r5", TensorProto.FLOAT, [64, 64]),
                               helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])])
    model = ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    segmented = compare(model, target="emu:fp16", feeds=feeds, capture_budget_mb=0.02)
    grouped = compare(model, target="emu:fp16", feeds=feeds, capture_budget_mb=0.02, segments=False)
    assert [d.tensor for d in segmented.tensors] == [d.tensor for d in grouped.tensors] and segmented.verdict() == grouped.verdict()
