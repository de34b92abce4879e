"""Models whose intermediate values are sequences (SequenceConstruct / SplitToSequence), as in ONNX's
own backend test models: compared element by element, never a traceback."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from aligner import bisect, compare
from aligner.graph.model import ModelGraph


def _sequence_model(b: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    nodes = [helper.make_node("Mul", ["x", "a"], ["t1"], name="/scale_a/Mul"),
             helper.make_node("Mul", ["x", "b"], ["t2"], name="/scale_b/Mul"),
             helper.make_node("SequenceConstruct", ["t1", "t2"], ["seq"], name="/pack/SequenceConstruct"),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], name="/unpack/ConcatFromSequence", axis=0)]
    inits = [nh.from_array(np.array(2.0, np.float32), "a"), nh.from_array(np.array(b, np.float32), "b")]
    return helper.make_model(helper.make_graph(nodes, "seq", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_sequence_is_compared_and_an_edit_before_it_is_named():
    graph, edited = ModelGraph(_sequence_model(3.0)), ModelGraph(_sequence_model(3.3))
    result = compare(graph, target="ort:cpu:fp32", target_model=edited)
    assert result.first_divergent.node == "/scale_b/Mul"
    seq = next(t for t in result.tensors if t.tensor == "seq")
    assert seq.diverges and seq.shape == (2,) and seq.dtype == "sequence(float32)"
    assert bisect(graph, target="ort:cpu:fp32", target_model=edited, strategy="frontier").first_divergent.node == "/scale_b/Mul"
    clean = compare(graph, target="emu:fp16")
    assert clean.first_divergent is None and any(t.tensor == "seq" for t in clean.tensors)


@pytest.mark.parametrize("case", ["test_sequence_model1", "test_sequence_model2", "test_sequence_model3"])
def test_onnx_backend_sequence_models_compare_and_bisect(case):
    folder = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "simple", case)
    graph = ModelGraph.load(os.path.join(folder, "model.onnx"))
    assert compare(graph, target="emu:fp16").first_divergent is None
    assert not bisect(graph, target="emu:fp16", strategy="all").diverged
