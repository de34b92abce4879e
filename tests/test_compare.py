"""Layer-wise compare on real exported architectures, with faults whose location is known."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from aligner.backends import reference_runner
from aligner.compare import compare
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs
from aligner.examples.faults import change_gather_index


def test_clean_models_do_not_diverge_in_fp16(cnn_path, detr_path):
    for path in (cnn_path, detr_path):
        result = compare(path, target="emu:fp16")
        assert result.first_nonfinite is None
        assert result.tensors[-1].metrics["rel_l2"] < 2e-2


def _scale_conv(path, tmp_path, factor):
    """Fault (a): scale the weights of the second conv of layer2 so its output passes 65504."""
    model = onnx.load(str(path))
    graph = ModelGraph(model)
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    victim = convs[-1]
    weight = graph.initializers[victim.input[1]]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    out = tmp_path / "scaled.onnx"
    onnx.save(graph.model, str(out))
    return out, victim.name


def test_fp16_overflow_is_reported_at_the_scaled_conv(cnn_path, tmp_path):
    path, victim = _scale_conv(cnn_path, tmp_path, 1e6)
    graph = ModelGraph.load(path)
    feeds = make_inputs(graph)
    ref = reference_runner(graph).run(feeds, [graph.node(victim).output[0]])
    assert np.abs(ref[graph.node(victim).output[0]]).max() > 65504  # the fault is where we think
    result = compare(graph, target="emu:fp16", feeds=feeds)
    assert result.first_nonfinite.node == victim
    assert result.first_divergent.node == victim


def test_edited_gather_is_first_divergent(detr_legacy_path, tmp_path):
    edited, victim = change_gather_index(detr_legacy_path, tmp_path)
    result = compare(detr_legacy_path, target="ort:cpu:fp32", target_model=edited)
    assert result.first_divergent is not None
    assert result.first_divergent.node == victim
    assert result.first_divergent.op_type == "Gather"


def test_capture_in_groups_streams_to_disk_with_identical_results(vit_path, vit_inputs, tmp_path):
    whole = compare(vit_path, target="emu:fp16", feeds=vit_inputs)
    grouped = compare(vit_path, target="emu:fp16", feeds=vit_inputs, capture_budget_mb=0, store_dir=tmp_path / "store")
    assert len(list((tmp_path / "store").glob("*.npy"))) == len(whole.tensors)
    assert [t.to_dict() for t in grouped.tensors] == [t.to_dict() for t in whole.tensors]
    # a tensor stored again (segments that fall back to groups store the reference twice) keeps one file
    import numpy as np

    from aligner.compare.store import DiskStore

    store = DiskStore(tmp_path / "again")
    store.put("a/b", np.zeros(2, np.float32))
    store.put("a/b", np.ones(2, np.float32))
    store.flush()
    assert len(list((tmp_path / "again").glob("*.npy"))) == 1 and store.get("a/b").tolist() == [1.0, 1.0]


def test_results_in_topological_order_with_table(vit_path, vit_inputs):
    result = compare(vit_path, target="emu:fp16", feeds=vit_inputs)
    indices = [t.index for t in result.tensors]
    assert indices == sorted(indices)
    frame = result.to_frame()
    assert len(frame) == len(result.tensors) and {"rel_l2", "mvre", "cosine", "snr_db", "diverges"} <= set(frame.columns)


def test_bf16_intermediates_are_captured_as_fp32_values():
    """numpy has no bfloat16: a captured BF16 tensor comes back upcast, with its rounding visible."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="T"),
             helper.make_node("Reshape", ["t", "shape"], ["y"], name="R")]
    shape = numpy_helper.from_array(np.array([6], np.int64), "shape")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [shape]), opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.array([[1, 2, 3], [4, 5, 1.001]], np.float32)}  # 1.001 is 1.0 in bfloat16
    result = compare(ModelGraph(model), target="ort:cpu:bf16", feeds=feeds)
    transposed = next(t for t in result.tensors if t.tensor == "t")
    assert transposed.dtype == "float32"
    assert abs(transposed.metrics["max_abs"] - 0.001) < 1e-5
