"""Fuse DETR-style additive-mask softmax into the ``aligner::MaskedSoftmax`` plugin op.

The pattern the exporters emit for attention with a padding mask::

    bias = Where(cond, a, b)          # scalars: one is 0, the other large negative (or -inf)
    y = Softmax(Add(scores, bias), axis=-1)

becomes ``y = MaskedSoftmax(scores, keep, fill=big)`` with ``keep = cond`` when ``a`` is 0 (else
``Not(cond)``). The boolean mask is read directly: no FP16 -inf constant, no ``Where`` (which has no
INT8 kernel in TensorRT). Softmaxes on another axis, masks that are not a ``Where`` of constants,
and intermediates read elsewhere are left as they are, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from aligner.graph.model import ModelGraph
from aligner.passes.layernorm import FuseResult, const_value, raise_opset, rebuild
from aligner.plugin import DOMAIN, get

BIG_NEGATIVE = -1e4  # a mask value at or below this means "masked out"


def _last_axis(graph: ModelGraph, node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    info = graph.tensors.get(node.input[0])
    rank = len(info.shape) if info is not None and info.shape is not None else None
    return graph.opset >= 13 and (axis == -1 or (rank is not None and axis == rank - 1))


def find_masked_softmaxes(graph: ModelGraph) -> tuple[dict, set[str], list[str], list[str]]:
    """(replacements by node, nodes removed, fused Softmax names, why others were left) — no copy."""
    spec = get("MaskedSoftmax")
    replaced, removed, fused, skipped = {}, set(), [], []
    for softmax in [n for n in graph.nodes if n.op_type == "Softmax"]:
        add = graph.producer.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        where = next(((i, graph.producer[x]) for i, x in enumerate(add.input) if x in graph.producer and graph.producer[x].op_type == "Where"), None)
        if where is None:
            skipped.append(f"{softmax.name}: the added mask is not a Where of constants")
            continue
        slot, where = where
        scores = add.input[1 - slot]
        a, b = const_value(graph, where.input[1]), const_value(graph, where.input[2])
        cond_info = graph.tensors.get(where.input[0])
        if a is None or b is None or np.size(a) != 1 or np.size(b) != 1 or cond_info is None or cond_info.elem_type != TensorProto.BOOL:
            skipped.append(f"{softmax.name}: the added mask is not a Where of constants on a boolean mask")
            continue
        a, b = float(np.ravel(a)[0]), float(np.ravel(b)[0])
        if a == 0.0 and b <= BIG_NEGATIVE:
            keep_is_cond, fill = True, b
        elif b == 0.0 and a <= BIG_NEGATIVE:
            keep_is_cond, fill = False, a
        else:
            skipped.append(f"{softmax.name}: mask values {a:g}/{b:g} are not 0 and a large negative number")
            continue
        if not _last_axis(graph, softmax):
            skipped.append(f"{softmax.name}: softmax is not over the last axis")
            continue
        if (len(graph.consumers.get(add.output[0], [])) != 1 or add.output[0] in graph.output_names
                or scores not in graph.tensors or not graph.tensors[scores].is_float):
            skipped.append(f"{softmax.name}: the masked scores are read elsewhere")
            continue
        base = softmax.name.rsplit("/", 1)[0] if "/" in softmax.name else softmax.name
        new_nodes, keep = [], where.input[0]
        if not keep_is_cond:
            keep = f"{base}/MaskedSoftmax_keep"
            new_nodes.append(helper.make_node("Not", [where.input[0]], [keep], name=f"{base}/MaskedSoftmax_Not"))
        new_nodes.append(spec.make_node([scores, keep], [softmax.output[0]], name=f"{base}/MaskedSoftmax", axis=-1, fill=max(fill, -3.4028234663852886e38)))
        replaced[softmax.name] = (new_nodes, ())
        removed.add(add.name)
        if all(c.name in (add.name,) for c in graph.consumers.get(where.output[0], [])) and where.output[0] not in graph.output_names:
            removed.add(where.name)
        fused.append(softmax.name)
    return replaced, removed, fused, skipped


def fuse_masked_softmax(graph: ModelGraph) -> FuseResult:
    replaced, removed, fused, skipped = find_masked_softmaxes(graph)
    model = rebuild(graph, replaced, removed)
    if fused:
        raise_opset(model, get("MaskedSoftmax").version, DOMAIN)
    return FuseResult(model, tuple(fused), tuple(skipped))


__all__ = ["find_masked_softmaxes", "fuse_masked_softmax"]
