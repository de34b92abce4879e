"""Standalone pieces of a model: a set of nodes fed from graph inputs.

``subgraph_model`` keeps the edges between the chosen nodes (a repro: the nodes run as a chain);
with ``decoupled=True`` every node reads *all* its activation inputs from graph inputs instead,
and its outputs are renamed ``<name>__aligner_isolated``, so one run gives each node's own result
on reference inputs (isolation: inherited error does not count).

Initializers and Constant nodes the chosen nodes read come along unchanged: an edited constant is
part of the node it feeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from aligner.graph.model import ModelGraph, _node_inputs

ISOLATED = "__aligner_isolated"


def isolated_name(tensor: str) -> str:
    return tensor + ISOLATED


def boundary_inputs(graph: ModelGraph, names: Iterable[str], decoupled: bool = False) -> list[str]:
    """Activation tensors the nodes read that must come from outside (graph inputs of the piece)."""
    chosen = [graph.node(n) for n in names]
    produced_inside = set() if decoupled else {o for n in chosen for o in n.output if o}
    out: dict[str, None] = {}
    for node in chosen:
        for name in sorted(_node_inputs(node)) if node.attribute else node.input:
            if not name or name in graph.initializers or name in produced_inside:
                continue
            src = graph.producer.get(name)
            if src is not None and src.op_type == "Constant":
                continue
            out[name] = None
    return list(out)


def subgraph_model(
    graph: ModelGraph,
    names: Iterable[str],
    values: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None = None,
    decoupled: bool = False,
) -> onnx.ModelProto:
    """A model of the nodes ``names`` whose boundary inputs are graph inputs typed from ``values``
    (values of outputs, when given, only set their shapes).

    Outputs: ``outputs`` if given; otherwise every tensor a chosen node produces that leaves the
    piece (decoupled: every output, renamed with :func:`isolated_name`).
    """
    names = [n for n in dict.fromkeys(names) if graph.node(n).op_type != "Constant"]
    chosen = [graph.node(n) for n in names]
    chosen_set = set(names)
    inputs = boundary_inputs(graph, names, decoupled)
    missing = [i for i in inputs if i not in values]
    if missing:
        raise ValueError(f"no value for boundary input(s) {missing[:5]}")

    nodes: list[onnx.NodeProto] = []
    constants: dict[str, onnx.NodeProto] = {}
    for node in chosen:
        for name in _node_inputs(node):
            src = graph.producer.get(name)
            if src is not None and src.op_type == "Constant":
                constants[src.name] = src
    nodes.extend(constants.values())
    for node in chosen:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if decoupled:
            for i, out in enumerate(copy.output):
                if out:
                    copy.output[i] = isolated_name(out)
        nodes.append(copy)

    if outputs is None:
        if decoupled:
            outputs = [isolated_name(o) for n in chosen for o in n.output if o]
        else:
            outputs = [
                o for n in chosen for o in n.output
                if o and (o in graph.output_names or any(c.name not in chosen_set for c in graph.consumers.get(o, [])))
            ]
            if not outputs:  # nothing leaves: the last node's outputs
                outputs = [o for o in chosen[-1].output if o]
    used = {i for n in nodes for i in _node_inputs(n)}

    model = onnx.ModelProto()
    model.ir_version = graph.model.ir_version
    model.opset_import.extend(graph.model.opset_import)
    model.functions.extend(graph.model.functions)
    model.producer_name = "aligner"
    body = model.graph
    body.name = "aligner_piece"
    body.node.extend(nodes)
    body.initializer.extend(t for name, t in graph.initializers.items() if name in used)
    for name in inputs:
        value = np.asarray(values[name])
        body.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
    for name in outputs:
        base = name[: -len(ISOLATED)] if name.endswith(ISOLATED) else name
        info = graph.tensors.get(base)
        if info is not None and info.elem_type:
            shape = np.shape(values[base]) if base in values else info.shape  # a checker-valid model needs one
            body.output.append(helper.make_tensor_value_info(name, info.elem_type, shape))
        else:
            body.output.append(helper.make_empty_tensor_value_info(name))
    return model


__all__ = ["ISOLATED", "boundary_inputs", "isolated_name", "subgraph_model"]
