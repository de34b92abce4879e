"""Issue 20: a model with control flow (an If whose branches compute on outer float tensors, a Loop
carrying float state) runs in FP16 on ONNX Runtime and in the emulator, close to FP32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import aligner
from aligner.backends.emu.emulate import emulate_model
from aligner.graph.model import ModelGraph
from aligner.graph.precision import rewrite_precision

X = np.array([[0.1, -0.2, 0.3, 0.45]], dtype=np.float32)


def _branch(name: str, op: str) -> onnx.GraphProto:
    """Reads the outer activation ``a`` (stored FP16 by its unpinned producer) and the initializer
    ``k`` (also read by an unpinned node), computes in float."""
    nodes = [helper.make_node(op, ["a", "k"], [f"{name}_t"], name=f"{name}/{op}"),
             helper.make_node("Mul", [f"{name}_t", "x"], [f"{name}_out"], name=f"{name}/Mul")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 4])])


def if_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"], name="pre/Mul"),
        helper.make_node("Add", ["x", "k"], ["xk"], name="pre/Add"),
        helper.make_node("ReduceSum", ["xk"], ["s"], name="pre/ReduceSum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="pre/Greater"),
        helper.make_node("If", ["cond"], ["b"], name="state/If", then_branch=_branch("then", "Add"),
                         else_branch=_branch("else", "Sub")),
        helper.make_node("Tanh", ["b"], ["y"], name="post/Tanh"),
    ]
    inits = [numpy_helper.from_array(np.array([[1.5, 2.0, -3.0, 4.0]], np.float32), "w"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([[0.5, 0.25, 0.125, 0.75]], np.float32), "k")]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def loop_model() -> onnx.ModelProto:
    """Three steps of s = s * a + x: float state, an outer activation and a graph input read by the body."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["s_in", "a"], ["t"], name="body/Mul"),
         helper.make_node("Add", ["t", "x"], ["s_out"], name="body/Add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/Identity")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"], name="pre/Mul"),
             helper.make_node("Loop", ["n", "", "x"], ["s"], name="state/Loop", body=body),
             helper.make_node("Mul", ["s", "w"], ["y"], name="post/Mul")]
    inits = [numpy_helper.from_array(np.array([[0.5, 0.6, 0.7, 0.8]], np.float32), "w"),
             numpy_helper.from_array(np.array(3, np.int64), "n")]
    graph = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0].astype(np.float32)


@pytest.mark.parametrize("build", [if_model, loop_model])
@pytest.mark.parametrize("target", ["ort:cpu:fp16", "emu:fp16"])
def test_control_flow_runs_in_fp16_close_to_fp32(tmp_path, build, target):
    path = tmp_path / "model.onnx"
    onnx.save(build(), str(path))
    result = aligner.compare(path, target=target, feeds={"x": X})
    assert result.first_divergent is None, result.verdict()


@pytest.mark.parametrize("build", [if_model, loop_model])
@pytest.mark.parametrize("keep_io_types", [True, False])
def test_bodies_stay_fp32_and_the_emulator_agrees_with_the_rewrite(build, keep_io_types):
    graph = ModelGraph(build())
    mixed = rewrite_precision(graph, (), "fp16", keep_io_types)
    flow = next(n for n in graph.nodes if n.op_type in ("If", "Loop"))
    assert "control flow in FP32" in mixed.auto_pinned[flow.name]
    onnx.checker.check_model(mixed.model, full_check=True)  # every body type-checks against its parent
    reference = _run(graph.model, {"x": X})
    rewritten = _run(mixed.model, {"x": X if keep_io_types else X.astype(np.float16)})
    emulated = _run(emulate_model(graph, (), "fp16", keep_io_types).model, {"x": X})
    assert np.allclose(rewritten, reference, rtol=5e-3, atol=1e-3)
    assert np.allclose(emulated, rewritten, rtol=2e-3, atol=1e-3)
