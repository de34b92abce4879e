"""FP16/BF16 emulation on ONNX Runtime CPU (targets ``emu:fp16`` and ``emu:bf16``).

The emulated model mirrors :mod:`aligner.graph.precision` exactly, with FP32 arithmetic: a node
that is not pinned reads each FP32 input rounded to the low type (weights and Constant values
included; a tensor from a pinned producer is rounded on read) and stores its float outputs
rounded; a pinned node reads inputs as stored and stores FP32. Rounding is a Cast to the low type
and back, so values beyond 65504 become inf and tiny ones flush, as on the GPU. It does not model
fused kernels or low-precision accumulation inside a kernel. Control-flow bodies are left as they
are (FP32), as in the rewrite.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from aligner.graph.model import ModelGraph
from aligner.graph.precision import LOW_TYPE, Precision, auto_pinned, check_nodes, implicit_inputs, is_fp32, node_typing, rename_in_bodies


@dataclass(frozen=True)
class EmulatedModel:
    model: onnx.ModelProto
    auto_pinned: dict[str, str]


def emulate_model(graph: ModelGraph, fp32_nodes: Iterable[str] = (), precision: Precision = "fp16", keep_io_types: bool = True,
                  fused: Iterable[Collection[str]] = ()) -> EmulatedModel:
    """The emulated model; each set of node names in ``fused`` is one fused kernel: it reads its
    inputs rounded, computes inside in FP32 and stores only its outputs in the low precision."""
    low = LOW_TYPE[precision]
    group_of = {name: i for i, group in enumerate(fused) for name in group}
    internal = _internal_tensors(graph, group_of)
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
            elif unpinned and i not in typing[node.name].fp32_inputs and name not in stored_low and name not in internal:
                node.input[i] = round_of(name)
        # Bodies are never emulated (they compute in FP32, as the rewrite leaves them) and read outer
        # tensors as stored; only a graph input stored in the low type is read rounded, as in the rewrite.
        rename_in_bodies(node, {x: round_of(x) for x in implicit_inputs(node) if x in low_inputs})
        raw_outputs = []
        if unpinned and node.op_type != "Constant":
            for j, out in enumerate(node.output):
                if is_fp32(graph, out) and out not in internal:
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


def _internal_tensors(graph: ModelGraph, group_of: dict[str, int]) -> frozenset[str]:
    """Tensors written and read only inside one fused kernel (not graph outputs): never stored."""
    outputs = set(graph.output_names)
    inside = set()
    for node in graph.nodes:
        group = group_of.get(node.name)
        if group is None:
            continue
        for out in node.output:
            readers = graph.consumers.get(out, [])
            if out and out not in outputs and readers and all(group_of.get(r.name) == group for r in readers):
                inside.add(out)
    return frozenset(inside)
