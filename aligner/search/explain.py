"""Root cause of the first divergent node, and the plain-language story of a bisect."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aligner.compare.tolerance import Tolerance
from aligner.graph.model import ModelGraph
from aligner.limits import FLUSH_BELOW, LOW_MAX
from aligner.search.verdict import BisectResult, LocalError, RootCause, classify, nonfinite_reason

if TYPE_CHECKING:
    from aligner.search.probes import BisectRun

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def root_cause(run: "BisectRun", name: str, local: LocalError | None, locals_: list[LocalError], difference: str | None) -> RootCause:
    graph = run.graph
    node = run.other.node_by_name.get(name) or graph.node(name)
    inputs = [t for t in node.input if t and t not in graph.initializers]
    low = run.target.precision in ("fp16", "bf16")
    inputs_differ = any(run.diffs[t].metrics.get("max_abs", 0) > 0 for t in inputs if t in run.diffs) or (
        low and any(_is_float(graph, t) for t in node.input if t))
    discrete_out = all(not _is_float(graph, o) for o in node.output if o) and any(_is_float(graph, t) for t in node.input if t)
    kind = classify(node.op_type, local, inputs_differ, discrete_out, redefined=difference is not None, low_precision=low)
    metric, threshold = run.tol.metric, run.tol.threshold
    value = local.metrics.get(metric, float("nan")) if local and local.metrics else float("nan")
    if kind == "nonfinite":
        held = parameter_out_of_range(run.other, node, run.target.precision)
        reason = f"the node's own{held}" if held else nonfinite_reason(node.op_type, local.inputs, local.output, run.target.precision)
    elif kind == "discrete":
        worst_in = max((run.diffs[t].metrics.get(metric, 0.0) for t in inputs if t in run.diffs), default=0.0)
        reason = (f"{node.op_type} makes a choice (indices, booleans, rounding): its inputs differ from the reference only by "
                  f"{metric} {worst_in:.2g} (within tolerance), yet the choice flipped; what follows inherits that, so blame "
                  f"neither this node's arithmetic nor its consumers. Compare after sorting, or raise the precision of its inputs.")
    elif kind == "local" and local is not None and local.kernel:
        reason = (f"run as the target deploys it, inside the fused kernel {local.kernel!r} that computes "
                  f"{', '.join(local.kernel_nodes)}, with the reference's inputs, its output still differs ({metric} {value:.3g} > "
                  f"{threshold:g}), while each of those nodes run alone does not: the error is the fused kernel's"
                  + (f" arithmetic in {run.target.precision.upper()}" if low else "") + " (keep its nodes in FP32: "
                  f"--fp32-nodes {','.join(local.kernel_nodes)})")
    elif kind == "local":
        reason = (f"run alone on the target with the reference's inputs, its output still differs ({metric} {value:.3g} > "
                  f"{threshold:g}): the error is its own")
        if difference:
            reason += f"; the two graphs define this node differently: {difference}"
        elif low:
            reason += parameter_out_of_range(run.other, node, run.target.precision) or f" arithmetic in {run.target.precision.upper()}"
    else:
        top = [e for e in sorted(locals_, key=lambda e: e.metrics.get(metric, 0.0) if e.metrics else 0.0, reverse=True) if e.metrics][:3]
        listed = ", ".join(f"{e.node} ({e.op_type}, {metric} {e.metrics.get(metric, 0.0):.2g})" for e in top)
        reason = (f"its own error run alone is {metric} {value:.3g}, within the tolerance ({run.tol.clauses()[0]}): no single node is to "
                  f"blame, the error built up over the nodes before it" + (f"; largest local errors: {listed}" if listed else ""))
    return RootCause(name, node.op_type, graph.index_of.get(name, -1), kind, dict(local.metrics) if local else {}, reason)


def parameter_out_of_range(graph: ModelGraph, node: onnx.NodeProto, precision: str) -> str:
    """'' unless one of ``node``'s float parameters (initializers, Constant values) cannot be stored in
    ``precision``: then which one, its value and what it becomes (a running variance of 9.8e7 is inf
    in FP16, so a BatchNormalization divides by inf)."""
    limit, flush = LOW_MAX.get(precision), FLUSH_BELOW.get(precision)
    if limit is None:
        return ""
    for position, name in enumerate(node.input):
        value = graph.constant(name) if name else None
        if value is None or value.dtype.kind != "f" or value.size == 0:
            continue
        finite = np.abs(value[np.isfinite(value)])
        big = int(np.count_nonzero(finite > limit))
        if big:
            return (f" parameter: its input {position} {name!r} holds {big} value(s) up to {float(finite.max()):.3g}, beyond "
                    f"{precision.upper()} max {limit:g}: they are inf once stored in {precision.upper()}, whatever the inputs "
                    f"(keep this node in FP32, or fold the parameter away, e.g. BatchNormalization into its Conv)")
        tiny = int(np.count_nonzero((finite > 0) & (finite < flush)))
        if tiny and tiny == np.count_nonzero(finite):
            return (f" parameter: its input {position} {name!r} holds only values below {flush:.3g} ({precision.upper()}'s "
                    f"smallest), which are 0 once stored in {precision.upper()}")
    return ""


def _is_float(graph: ModelGraph, name: str) -> bool:
    info = graph.tensors.get(name)
    return info is not None and info.elem_type in FLOAT_TYPES


def node_difference(graph: ModelGraph, other: ModelGraph, name: str) -> str | None:
    """How ``other`` defines node ``name`` differently from ``graph`` (op, attributes, constants)."""
    if other is graph or name not in other.node_by_name or name not in graph.node_by_name:
        return None
    a, b = graph.node(name), other.node(name)
    if a.op_type != b.op_type:
        return f"op {a.op_type} became {b.op_type}"
    attrs_a = {x.name: helper.get_attribute_value(x) for x in a.attribute if x.type != onnx.AttributeProto.GRAPH}
    attrs_b = {x.name: helper.get_attribute_value(x) for x in b.attribute if x.type != onnx.AttributeProto.GRAPH}
    for key in sorted(set(attrs_a) | set(attrs_b)):
        va, vb = attrs_a.get(key, "(default)"), attrs_b.get(key, "(default)")
        if isinstance(va, onnx.TensorProto) and isinstance(vb, onnx.TensorProto):
            va, vb = numpy_helper.to_array(va), numpy_helper.to_array(vb)
            if va.shape == vb.shape and np.array_equal(va, vb):
                continue
            return f"attribute {key!r} holds different values"
        if va != vb:
            return f"attribute {key!r} is {_short(vb)} instead of {_short(va)}"
    for ta, tb in zip(a.input, b.input):
        va, vb = graph.constant(ta), other.constant(tb)
        if va is None or vb is None:
            continue
        if va.shape != vb.shape:
            return f"constant input {tb!r} has shape {vb.shape} instead of {va.shape}"
        changed = va != vb if va.dtype.kind != "f" else ~np.isclose(va, vb, rtol=0, atol=0, equal_nan=True)
        if changed.any():
            i = tuple(np.argwhere(changed)[0])
            return (f"constant input {tb!r} differs in {int(changed.sum())} of {va.size} value(s), e.g. "
                    f"{_short(va[i] if va.ndim else va)} became {_short(vb[i] if vb.ndim else vb)}")
    if list(a.input) != list(b.input):
        return "it reads different tensors"
    return None


def _short(value) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def explain(result: BisectResult, tol: Tolerance) -> str:
    """A few sentences a user can act on."""
    if result.failed:
        return f"The target failed to build or run, so no verdict: {result.failed}"
    first, cause, origin = result.first_divergent, result.root_cause, result.nonfinite_origin
    parts = []
    if first is None:
        text = f"No divergence: the target matches the reference within {tol.describe()}"
        return text + (f" ({result.checked})." if result.checked else ".") + "".join(f" Note: {n}." for n in result.notes)
    if first is not None:
        how = "has NaN/inf where the reference is finite" if first.new_nonfinite else (
            f"differs by {tol.metric} {first.metrics.get(tol.metric, float('nan')):.3g}" if first.metrics else f"differs ({first.reason})")
        parts.append(f"The target first departs from the reference at {first.node!r} ({first.op_type}, node #{first.index}): "
                     f"its output {first.tensor!r} {how}"
                     + (f" (written by the deployed kernel {first.kernel!r}, which may fuse the nodes before it)." if first.kernel and first.kernel != first.node else "."))
    if cause is not None:
        lead = {"local": "Root cause: this node's own error", "nonfinite": "Root cause: this node overflows on its own",
                "discrete": "Root cause: a discrete choice flipped", "inherited": "No single root cause"}[cause.kind]
        where = "" if first is not None and cause.node == first.node else f" at {cause.node!r} ({cause.op_type})"
        parts.append(f"{lead}{where} ({cause.kind}): {cause.reason}.")
    if origin is not None and (cause is None or origin.node != cause.node):
        parts.append(f"NaN/inf first appear at {origin.node!r} ({origin.op_type}): {origin.reason}.")
    if cause is not None and cause.kind in ("nonfinite", "local") and "fp16" in result.target:
        parts.append("To keep it (and only what is needed) in FP32, run `aligner precision`"
                     + (", or fuse the decomposed LayerNorm it belongs to (`aligner build --fuse layernorm`)." if cause.op_type in ("Pow", "ReduceMean") else "."))
    parts.append(f"Tolerance {tol.describe()}; strategy {result.strategy_used}: {result.checked or f'{result.target_runs} target run(s)'}.")
    parts += [f"Note: {n}." for n in result.notes]
    return " ".join(parts)


__all__ = ["explain", "node_difference", "root_cause"]
