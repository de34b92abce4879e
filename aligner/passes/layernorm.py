"""Fuse decomposed LayerNorms into the standard ``LayerNormalization`` op (opset 17).

The pattern the exporters emit at opset ≤ 16 (both with and without the affine part)::

    m = ReduceMean(x, axes=[-1]);  d = Sub(x, m);  p = Pow(d, 2);  v = ReduceMean(p, axes=[-1])
    s = Sqrt(Add(v, eps));  n = Div(d, s);  [y = Add(Mul(n, gamma), beta)]

becomes ``y = LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)``. TensorRT maps it to its
normalization layer and ONNX Runtime to its kernel; both compute the statistics in FP32, which
removes the FP16 overflow of the decomposed ``Pow``. Intermediate tensors read elsewhere keep the
pattern as it is. The model's default opset is raised to 17 when lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aligner.graph.model import ModelGraph


@dataclass(frozen=True)
class FuseResult:
    model: onnx.ModelProto
    fused: tuple[str, ...]  # the Pow node of each fused LayerNorm (its anchor)
    skipped: tuple[str, ...]  # patterns left alone, with why


def const_value(graph: ModelGraph, name: str) -> np.ndarray | None:
    return graph.constant(name)


def _axes_last(graph: ModelGraph, node: onnx.NodeProto) -> bool:
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        value = const_value(graph, node.input[1])
        axes = None if value is None else [int(v) for v in np.ravel(value)]
    rank = graph.tensors.get(node.input[0])
    last = -1 if rank is None or rank.shape is None else len(rank.shape) - 1
    return axes is not None and len(axes) == 1 and axes[0] in (-1, last)


def _only(graph: ModelGraph, tensor: str, op: str) -> onnx.NodeProto | None:
    users = graph.consumers.get(tensor, [])
    return users[0] if len(users) == 1 and users[0].op_type == op else None


@dataclass(frozen=True)
class Match:
    anchor: str  # the Pow node
    first: str  # the first node of the pattern, where the LayerNormalization goes
    nodes: frozenset[str]  # every node the LayerNormalization replaces
    layernorm: onnx.NodeProto
    initializers: tuple[onnx.TensorProto, ...] = ()


def find_layernorms(graph: ModelGraph) -> tuple[list[Match], list[str]]:
    """The decomposed LayerNorms that can be replaced, and why the others cannot (no rewriting)."""
    matches, skipped = [], []
    for pow_node in [n for n in graph.nodes if n.op_type == "Pow"]:
        exponent = const_value(graph, pow_node.input[1])
        sub = graph.producer.get(pow_node.input[0])
        if exponent is None or float(np.ravel(exponent)[0]) != 2.0 or sub is None or sub.op_type != "Sub":
            continue
        mean1 = graph.producer.get(sub.input[1])
        x = sub.input[0]
        if mean1 is None or mean1.op_type != "ReduceMean" or mean1.input[0] != x or not _axes_last(graph, mean1):
            continue
        mean2 = _only(graph, pow_node.output[0], "ReduceMean")
        add_eps = mean2 and _only(graph, mean2.output[0], "Add")
        sqrt = add_eps and _only(graph, add_eps.output[0], "Sqrt")
        div = sqrt and _only(graph, sqrt.output[0], "Div")
        if not (mean2 and _axes_last(graph, mean2) and add_eps and sqrt and div and div.input[0] == sub.output[0]):
            skipped.append(f"{pow_node.name}: not the full ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div chain")
            continue
        eps = const_value(graph, add_eps.input[1] if add_eps.input[0] == mean2.output[0] else add_eps.input[0])
        users_of_d = {n.name for n in graph.consumers.get(sub.output[0], [])}
        if eps is None or np.size(eps) != 1 or users_of_d != {pow_node.name, div.name} or len(graph.consumers.get(mean1.output[0], [])) != 1:
            skipped.append(f"{pow_node.name}: its intermediates are read elsewhere or epsilon is not a constant")
            continue
        chain = [mean1, sub, pow_node, mean2, add_eps, sqrt, div]
        out, gamma, beta = div.output[0], None, None
        mul = _only(graph, div.output[0], "Mul")
        if mul is not None:
            g = next((i for i in mul.input if i != div.output[0]), None)
            if g is not None and const_value(graph, g) is not None:
                gamma, out = g, mul.output[0]
                chain.append(mul)
                add_b = _only(graph, mul.output[0], "Add")
                b = add_b and next((i for i in add_b.input if i != mul.output[0]), None)
                if b is not None and const_value(graph, b) is not None:
                    beta, out = b, add_b.output[0]
                    chain.append(add_b)
        names = {n.name for n in chain}
        inner = [o for n in chain for o in n.output if o and o != out]
        if any(o in graph.output_names or any(c.name not in names for c in graph.consumers.get(o, [])) for o in inner):
            skipped.append(f"{pow_node.name}: its intermediates are read elsewhere")
            continue
        extra = []
        if gamma is None:  # LayerNormalization needs a scale: ones
            gamma = f"{pow_node.name}/aligner_ones"
            width = graph.tensors[x].shape[-1] if graph.tensors.get(x) and graph.tensors[x].shape else None
            if not isinstance(width, int):
                skipped.append(f"{pow_node.name}: no affine part and the normalized width is unknown")
                continue
            extra.append(numpy_helper.from_array(np.ones(width, np.float32), gamma))
        ln = helper.make_node("LayerNormalization", [x, gamma] + ([beta] if beta else []), [out],
                              name=f"{pow_node.name.rsplit('/', 1)[0]}/LayerNormalization", axis=-1, epsilon=float(np.ravel(eps)[0]))
        matches.append(Match(pow_node.name, mean1.name, frozenset(n.name for n in chain), ln, tuple(extra)))
    return matches, skipped


def fuse_layernorm(graph: ModelGraph) -> FuseResult:
    matches, skipped = find_layernorms(graph)
    model = rebuild(graph, {m.first: ([m.layernorm], m.initializers) for m in matches}, set().union(*(m.nodes for m in matches)) if matches else set())
    if matches:
        raise_opset(model, 17)
    return FuseResult(model, tuple(m.anchor for m in matches), tuple(skipped))


def rebuild(graph: ModelGraph, replaced: dict[str, tuple[list[onnx.NodeProto], tuple[onnx.TensorProto, ...]]], removed: set[str]) -> onnx.ModelProto:
    """A copy of the model where each node named in ``replaced`` becomes its new nodes (plus
    initializers) and the nodes in ``removed`` are dropped; value_info is cleared."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    nodes = []
    for node in graph.model.graph.node:
        if node.name in replaced:
            new_nodes, inits = replaced[node.name]
            nodes.extend(new_nodes)
            model.graph.initializer.extend(inits)
        elif node.name not in removed:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]
    return model


def raise_opset(model: onnx.ModelProto, version: int, domain: str = "") -> None:
    """Raise (or add) the opset import of ``domain`` to at least ``version``."""
    for opset in model.opset_import:
        if opset.domain in ((domain, "ai.onnx") if domain == "" else (domain,)):
            opset.version = max(opset.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


__all__ = ["FuseResult", "Match", "const_value", "find_layernorms", "fuse_layernorm", "raise_opset", "rebuild"]
