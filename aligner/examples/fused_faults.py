"""Faults that a fusing runtime hides from a naive observer (the true-verdict cases): an edited Conv
that ONNX Runtime folds into its BatchNormalization, and a DETR-style decoder whose attention scale
was changed where the softmax masks it. Built in code, with known fault locations."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh


def scale_initializer(model: onnx.ModelProto, name: str, factor: float, channel: int | None = 0) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` (its first output channel, or all of it) times ``factor``."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    tensor = next(t for t in edited.graph.initializer if t.name == name)
    value = nh.to_array(tensor).copy()
    if channel is None:
        value *= factor
    else:
        value[channel] *= factor
    tensor.CopyFrom(nh.from_array(value, name))
    return edited


def conv_bn_net(layers: int = 12, channels: int = 32, size: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A CNN backbone of Conv -> BatchNormalization -> Relu blocks (trained-like BN statistics) and a
    1x1 Conv head. ONNX Runtime folds each BatchNormalization into its Conv; capturing a Conv's output
    stops that fold and moves the FP32 outputs by a few rounding steps (~1e-6)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "x", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits += [nh.from_array(w, f"w{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"/conv{i}/Conv", pads=[1, 1, 1, 1]))
        bn = {"s": 1 + 0.3 * rng.standard_normal(channels), "b": 0.1 * rng.standard_normal(channels),
              "m": 0.2 * rng.standard_normal(channels), "v": 0.5 + rng.random(channels)}  # scale, bias, running mean, variance
        inits += [nh.from_array(a.astype(np.float32), f"{n}{i}") for n, a in bn.items()]
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"], name=f"/bn{i}/BatchNormalization"))
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"/relu{i}/Relu"))
        x, cin = f"r{i}", channels
    nodes.append(helper.make_node("Conv", [x, "wh"], ["y"], name="/head/Conv"))
    inits.append(nh.from_array((rng.standard_normal((2, channels, 1, 1)) / np.sqrt(channels)).astype(np.float32), "wh"))
    g = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, size, size])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def masked_decoder(tokens: int = 100, dim: int = 256, layers: int = 4, scale_factor: float = 1.0, edit_layer: int = 2, seed: int = 0) -> onnx.ModelProto:
    """A DETR-style decoder: self-attention (MatMul, scale Mul, Softmax), decomposed LayerNorms and an
    FFN per layer, exported as at opset 16. ``scale_factor`` multiplies the attention scale of layer
    ``edit_layer`` (the injected fault); fed :func:`near_uniform_queries` its softmax rows stay nearly
    uniform, so the edited ``Mul``'s output moves by half while the outputs move by ~1e-7."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    inits.append(nh.from_array(np.array(1 / np.sqrt(dim), np.float32), "scale"))
    for i in range(layers):
        for n in "qkvo":
            inits.append(nh.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), f"W{n}{i}"))
        p = f"/decoder/layers.{i}/self_attn"
        nodes += [helper.make_node("MatMul", [x, f"Wq{i}"], [f"{p}/q"], name=f"{p}/q_proj/MatMul"),
                  helper.make_node("MatMul", [x, f"Wk{i}"], [f"{p}/k"], name=f"{p}/k_proj/MatMul"),
                  helper.make_node("MatMul", [x, f"Wv{i}"], [f"{p}/v"], name=f"{p}/v_proj/MatMul"),
                  helper.make_node("Transpose", [f"{p}/k"], [f"{p}/kt"], name=f"{p}/Transpose", perm=[0, 2, 1]),
                  helper.make_node("MatMul", [f"{p}/q", f"{p}/kt"], [f"{p}/logits"], name=f"{p}/MatMul"),
                  helper.make_node("Mul", [f"{p}/logits", "scale" if i != edit_layer else f"scale{i}"], [f"{p}/Mul_output_0"], name=f"{p}/Mul"),
                  helper.make_node("Softmax", [f"{p}/Mul_output_0"], [f"{p}/attn"], name=f"{p}/Softmax", axis=-1),
                  helper.make_node("MatMul", [f"{p}/attn", f"{p}/v"], [f"{p}/ctx"], name=f"{p}/MatMul_1"),
                  helper.make_node("MatMul", [f"{p}/ctx", f"Wo{i}"], [f"{p}/out"], name=f"{p}/out_proj/MatMul"),
                  helper.make_node("Add", [x, f"{p}/out"], [f"/decoder/layers.{i}/Add_output_0"], name=f"/decoder/layers.{i}/Add")]
        x = f"/decoder/layers.{i}/Add_output_0"
        x = _layernorm(nodes, inits, x, f"/decoder/layers.{i}/norm1", dim, rng)
        for n, shape in (("W1", (dim, 4 * dim)), ("W2", (4 * dim, dim))):
            inits.append(nh.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), f"{n}_{i}"))
        inits.append(nh.from_array((0.1 * rng.standard_normal(4 * dim)).astype(np.float32), f"b1_{i}"))
        f = f"/decoder/layers.{i}/ffn"
        nodes += [helper.make_node("MatMul", [x, f"W1_{i}"], [f"{f}/h"], name=f"{f}/fc1/MatMul"),
                  helper.make_node("Add", [f"{f}/h", f"b1_{i}"], [f"{f}/hb"], name=f"{f}/fc1/Add"),
                  helper.make_node("Relu", [f"{f}/hb"], [f"{f}/r"], name=f"{f}/Relu"),
                  helper.make_node("MatMul", [f"{f}/r", f"W2_{i}"], [f"{f}/o"], name=f"{f}/fc2/MatMul"),
                  helper.make_node("Add", [x, f"{f}/o"], [f"{f}/Add_output_0"], name=f"{f}/Add")]
        x = _layernorm(nodes, inits, f"{f}/Add_output_0", f"/decoder/layers.{i}/norm2", dim, rng)
        if i == edit_layer:
            inits.append(nh.from_array(np.array(scale_factor / np.sqrt(dim), np.float32), f"scale{i}"))
    nodes.append(helper.make_node("Identity", [x], ["y"], name="/out/Identity"))
    g = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, dim])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)

def near_uniform_queries(tokens: int = 100, dim: int = 256, seed: int = 1) -> dict[str, np.ndarray]:
    """Object queries that are nearly all the same (a decoder's first inputs): the attention is nearly uniform."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(dim).astype(np.float32)
    return {"x": (base + 1e-3 * rng.standard_normal((1, tokens, dim))).astype(np.float32)}


def _layernorm(nodes, inits, x, p, dim, rng):
    """LayerNorm decomposed as exported at opset 16 (ONNX Runtime fuses it back into one kernel)."""
    inits += [nh.from_array(np.array(2.0, np.float32), f"{p}/two"), nh.from_array(np.array(1e-5, np.float32), f"{p}/eps"),
              nh.from_array((1 + 0.1 * rng.standard_normal(dim)).astype(np.float32), f"{p}.weight"),
              nh.from_array((0.1 * rng.standard_normal(dim)).astype(np.float32), f"{p}.bias")]
    nodes += [helper.make_node("ReduceMean", [x], [f"{p}/mean"], name=f"{p}/ReduceMean", axes=[-1]),
              helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/d"], name=f"{p}/Sub"),
              helper.make_node("Pow", [f"{p}/d", f"{p}/two"], [f"{p}/sq"], name=f"{p}/Pow"),
              helper.make_node("ReduceMean", [f"{p}/sq"], [f"{p}/var"], name=f"{p}/ReduceMean_1", axes=[-1]),
              helper.make_node("Add", [f"{p}/var", f"{p}/eps"], [f"{p}/ve"], name=f"{p}/Add"),
              helper.make_node("Sqrt", [f"{p}/ve"], [f"{p}/std"], name=f"{p}/Sqrt"),
              helper.make_node("Div", [f"{p}/d", f"{p}/std"], [f"{p}/n"], name=f"{p}/Div"),
              helper.make_node("Mul", [f"{p}/n", f"{p}.weight"], [f"{p}/w"], name=f"{p}/Mul"),
              helper.make_node("Add", [f"{p}/w", f"{p}.bias"], [f"{p}/Add_1_output_0"], name=f"{p}/Add_1")]
    return f"{p}/Add_1_output_0"


__all__ = ["conv_bn_net", "masked_decoder", "near_uniform_queries", "scale_initializer"]
