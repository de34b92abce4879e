"""A tiny ViT classifier that reads raw 0-255 pixels: a genuine FP16 overflow, built in code.

Many deployed models skip input normalisation (the camera's bytes go straight in). Here the
patch-embedding Conv sees pixels of up to 255, so its outputs reach several hundred, and the first
LayerNorm, exported decomposed as at opset <= 16, squares the deviation from the token mean with
``Pow``: anything beyond 256 squares past FP16's 65504 and becomes inf. The variance is then inf,
``x / sqrt(var)`` becomes 0 and every token of the block collapses to the LayerNorm's bias, so an
FP16 build classifies every image alike. Keeping ``Pow`` alone in FP32 does not help (its FP32
output is rounded to FP16 again by the next ``ReduceMean``); the chain ``Pow, ReduceMean`` (with
``Add, Sqrt``) must stay FP32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGE = 64
PATCH = 8
DIM = 48
HEADS = 1
BLOCKS = 2
CLASSES = 10


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> str:
        value = (self.rng.standard_normal(shape) * std + mean).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], scope: str, suffix: str = "", **attrs) -> str:
        name = f"{scope}/{op_type}{suffix}"
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def layer_norm(self, x: str, scope: str) -> str:
        """LayerNorm as the legacy exporter writes it at opset <= 16."""
        mean = self.op("ReduceMean", [x], scope, axes=[-1], keepdims=1)
        centered = self.op("Sub", [x, mean], scope)
        square = self.op("Pow", [centered, self.const(f"{scope}.two", np.float32(2.0))], scope)
        var = self.op("ReduceMean", [square], scope, "_1", axes=[-1], keepdims=1)
        var_eps = self.op("Add", [var, self.const(f"{scope}.eps", np.float32(1e-5))], scope)
        std = self.op("Sqrt", [var_eps], scope)
        normed = self.op("Div", [centered, std], scope)
        scaled = self.op("Mul", [normed, self.weight(f"{scope}.weight", (DIM,), 0.1, 1.0)], scope)
        return self.op("Add", [scaled, self.weight(f"{scope}.bias", (DIM,), 0.1)], scope, "_1")

    def linear(self, x: str, scope: str, fan_in: int, fan_out: int) -> str:
        y = self.op("MatMul", [x, self.weight(f"{scope}.weight", (fan_in, fan_out), fan_in**-0.5)], scope)
        return self.op("Add", [y, self.weight(f"{scope}.bias", (fan_out,), 0.02)], scope)

    def block(self, x: str, scope: str) -> str:
        h = self.layer_norm(x, f"{scope}/norm1")
        q = self.linear(h, f"{scope}/attn/q", DIM, DIM)
        k = self.linear(h, f"{scope}/attn/k", DIM, DIM)
        v = self.linear(h, f"{scope}/attn/v", DIM, DIM)
        kt = self.op("Transpose", [k], f"{scope}/attn", perm=[0, 2, 1])
        scores = self.op("MatMul", [q, kt], f"{scope}/attn")
        scaled = self.op("Mul", [scores, self.const(f"{scope}.scale", np.float32(DIM**-0.5))], f"{scope}/attn")
        probs = self.op("Softmax", [scaled], f"{scope}/attn", axis=-1)
        ctx = self.op("MatMul", [probs, v], f"{scope}/attn", "_1")
        x = self.op("Add", [x, self.linear(ctx, f"{scope}/attn/proj", DIM, DIM)], scope)
        h = self.layer_norm(x, f"{scope}/norm2")
        h = self.op("Relu", [self.linear(h, f"{scope}/mlp/fc1", DIM, 2 * DIM)], f"{scope}/mlp")
        return self.op("Add", [x, self.linear(h, f"{scope}/mlp/fc2", 2 * DIM, DIM)], scope, "_1")


def tiny_vit(seed: int = 0, opset: int = 16) -> onnx.ModelProto:
    """The example model: input ``pixels`` [N, 3, 64, 64] in 0-255, output ``logits`` [N, 10]."""
    b = _Builder(seed)
    # Patch embedding trained on unnormalised pixels: weights of a typical magnitude for 0-1 input.
    fan_in = 3 * PATCH * PATCH
    conv = b.op("Conv", ["pixels", b.weight("patch_embed.weight", (DIM, 3, PATCH, PATCH), 1.5 * fan_in**-0.5), b.weight("patch_embed.bias", (DIM,), 0.02)],
                "/patch_embed", kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    tokens = b.op("Reshape", [conv, b.const("tokens.shape", np.array([0, DIM, -1], np.int64))], "/patch_embed")
    x = b.op("Transpose", [tokens], "/patch_embed", perm=[0, 2, 1])
    x = b.op("Add", [x, b.weight("pos_embed", (1, (IMAGE // PATCH) ** 2, DIM), 0.02)], "/patch_embed")
    for i in range(BLOCKS):
        x = b.block(x, f"/blocks.{i}")
    x = b.layer_norm(x, "/norm")
    pooled = b.op("ReduceMean", [x], "/head", axes=[1], keepdims=0)
    logits = b.op("Gemm", [pooled, b.weight("head.weight", (CLASSES, DIM), DIM**-0.5), b.weight("head.bias", (CLASSES,), 0.02)], "/head", transB=1)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/head/Identity"))
    graph = helper.make_graph(
        b.nodes, "tiny_vit_raw_pixels",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="aligner.examples")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def example_inputs(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic camera images as raw bytes in float: smooth gradients plus bright shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE] / IMAGE
    images = []
    for _ in range(batch):
        img = np.stack([(a * xx + (1 - a) * yy) for a in rng.random(3)]) * 180
        cy, cx, r = rng.integers(12, 52, size=2).tolist() + [int(rng.integers(6, 14))]
        img[:, max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] += rng.random((3, 1, 1)) * 120
        images.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255))
    return {"pixels": np.round(np.stack(images)).astype(np.float32)}
