"""FP16/BF16 emulation on ONNX Runtime CPU (targets ``emu:fp16`` and ``emu:bf16``).

The emulated model mirrors :mod:`aligner.graph.precision` exactly, with FP32 arithmetic: a node
that is not pinned reads each FP32 input rounded to the low type (weights and Constant values
included; a tensor from a pinned producer is rounded on read) and stores its float outputs
rounded; a pinned node reads inputs as stored and stores FP32. Rounding is a Cast to the low type
and back, so values beyond 65504 become inf and tiny ones flush, as on the GPU. It does not model
fused kernels or low-precision accumulation inside a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from aligner.graph.model import ModelGraph
from aligner.graph.precision import LOW_TYPE, Precision, auto_pinned, check_nodes, is_fp32, node_typing


@dataclass(frozen=True)
class EmulatedModel:
    model: onnx.ModelProto
    auto_pinned: dict[str, str]


def emulate_model(graph: ModelGraph, fp32_nodes: Iterable[str] = (), precision: Precision = "fp16", keep_io_types: bool = True) -> EmulatedModel:
    low = LOW_TYPE[precision]
    typing = {n.name: node_typing(n, graph.opset, precision) for n in graph.nodes}
    auto = auto_pinned(graph, typing)
    pinned = check_nodes(graph, fp32_nodes) | set(auto)

    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    nodes: list[onnx.NodeProto] = []
    rounded: dict[str, str] = {}  # raw tensor -> its rounded copy
    stored_low: set[str] = set()

    def round_of(name: str) -> str:
        if name not in rounded:
            mid, out = f"{name}__emu_{precision}", f"{name}__emu_rt"
            nodes.append(helper.make_node("Cast", [name], [mid], to=low, name=f"aligner/emu/{name}/to_{precision}"))
            nodes.append(helper.make_node("Cast", [mid], [out], to=TensorProto.FLOAT, name=f"aligner/emu/{name}/to_fp32"))
            rounded[name] = out
        return rounded[name]

    low_inputs = set() if keep_io_types else {n for n in graph.input_names if is_fp32(graph, n)}
    for src in graph.model.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(src)
        unpinned = node.name not in pinned
        for i, name in enumerate(node.input):
            if not is_fp32(graph, name):
                continue
            if name in low_inputs:
                node.input[i] = round_of(name)
            elif unpinned and i not in typing[node.name].fp32_inputs and name not in stored_low:
                node.input[i] = round_of(name)
        raw_outputs = []
        if unpinned and node.op_type != "Constant":
            for j, out in enumerate(node.output):
                if is_fp32(graph, out):
                    node.output[j] = f"{out}__emu_raw"
                    raw_outputs.append(out)
        nodes.append(node)
        for out in raw_outputs:
            mid = f"{out}__emu_{precision}"
            nodes.append(helper.make_node("Cast", [f"{out}__emu_raw"], [mid], to=low, name=f"aligner/emu/{out}/to_{precision}"))
            nodes.append(helper.make_node("Cast", [mid], [out], to=TensorProto.FLOAT, name=f"aligner/emu/{out}/to_fp32"))
            stored_low.add(out)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return EmulatedModel(model, auto)
