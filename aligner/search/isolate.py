"""Isolation: each node's own error, from one target run of a decoupled graph per group.

Every chosen node reads the *reference* values of its inputs (graph inputs of the decoupled
graph) and writes renamed outputs, so the difference to the reference output is the node's own
error on the target; error it would inherit from upstream does not count.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aligner.backends import Runner, backend_of, make_runner
from aligner.backends.target import Target
from aligner.compare.layerwise import diff_tensor, plan_groups
from aligner.compare.tolerance import Tolerance
from aligner.errors import TargetRunError
from aligner.graph.decouple import boundary_inputs, isolated_name, subgraph_model
from aligner.graph.model import ModelGraph
from aligner.search.verdict import LocalError, Probe, ValueRange

log = logging.getLogger(__name__)


def isolate(
    graph: ModelGraph,
    names: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    reference: Runner,
    target: Target,
    tolerance: Tolerance,
    other: ModelGraph | None = None,
    sizes: Mapping[str, int] | None = None,
    budget_bytes: int = 256 * 2**20,
    on_probe: Callable[[Probe], None] | None = None,
) -> list[LocalError]:
    """Local errors of ``names`` (nodes of ``graph``), in topological order.

    The reference values come from ``reference`` running ``graph``; the nodes run on ``target``
    as ``other`` defines them (an edited copy), or as ``graph`` does; ``target``'s pins stay FP32.
    """
    if target.is_quantized:
        return isolate_quantized(graph, names, feeds, reference, target, tolerance, other, budget_bytes, on_probe)
    other = other or graph
    pinned = set(target.pins)
    nodes = [n for n in names if n in other.node_by_name and other.node(n).op_type != "Constant"]
    nodes.sort(key=lambda n: graph.index_of.get(n, other.index_of[n]))
    sizes = sizes or {}
    weight = {n: sum(sizes.get(t, 4 * 2**20) for t in _touched(other, n)) for n in nodes}
    groups = plan_groups(nodes, weight, budget_bytes)
    errors: list[LocalError] = []
    for group in groups:
        group = [n for n in group if all(t in graph.tensors or t in feeds for t in _touched(other, n))]
        if not group:
            continue
        inputs = boundary_inputs(other, group, decoupled=True)
        outputs = [o for n in group for o in other.node(n).output if o]
        ref = reference.run(dict(feeds), [t for t in dict.fromkeys(inputs + outputs) if t in reference.capturable])
        values = {t: ref[t] for t in inputs}
        piece = ModelGraph(subgraph_model(other, group, values, decoupled=True))
        runner = make_runner(piece, replace(target, pins=tuple(n for n in group if n in pinned), plan=None))  # a piece: no plan's model
        got = _probed(lambda: runner.run(values), len(outputs), on_probe)
        for name in group:
            errors.append(_local_error(graph, other, name, ref, got, tolerance))
        del ref, values, got
    return errors


def isolate_kernel(graph: ModelGraph, kernel, node: str, feeds: Mapping[str, np.ndarray], reference: Runner, target: Target,
                   tolerance: Tolerance, other: ModelGraph | None = None,
                   on_probe: Callable[[Probe], None] | None = None) -> LocalError | None:
    """The own error of one deployed kernel (a :class:`~aligner.graph.deployed.Kernel` of a fusing
    target), charged to ``node``: the kernel's original nodes as one piece, fed the reference's values
    of the tensors entering it, run on ``target`` (which fuses the piece as it fuses the model) and
    compared at ``node``'s outputs. A fault that exists only inside a fused kernel (a low-precision
    input to a fused GEMM whose epilogue cancels large terms) shows here, while each of its nodes run
    alone does not. None when the piece cannot be cut (a tensor inside has no reference value)."""
    other = other or graph
    members = [n for n in kernel.originals if n in other.node_by_name and other.node(n).op_type != "Constant"]
    if node not in members or len(members) < 2:
        return None
    members.sort(key=lambda n: other.index_of[n])
    inputs = boundary_inputs(other, members, decoupled=False)
    outputs = [o for o in other.node(node).output if o]
    wanted = [t for t in dict.fromkeys(inputs + outputs) if t in reference.capturable]
    ref = reference.run(dict(feeds), wanted)
    ref.update({t: feeds[t] for t in inputs if t in feeds})
    if not all(t in ref for t in inputs + outputs):
        return None
    values = {t: ref[t] for t in inputs}
    piece = ModelGraph(subgraph_model(other, members, values, outputs=outputs))
    runner = make_runner(piece, replace(target, pins=tuple(n for n in members if n in target.pins), plan=None))
    got = _probed(lambda: runner.run(values), len(outputs), on_probe)
    error = _local_error(graph, other, node, ref, {isolated_name(o): got[o] for o in outputs if o in got}, tolerance)
    return replace(error, kernel=kernel.name, kernel_nodes=tuple(members))


def _probed(run, tensors: int, on_probe):
    """``run()``, reported to ``on_probe`` as one isolation probe (failed when the target fails)."""
    try:
        got = run()
    except TargetRunError as exc:
        if on_probe:
            on_probe(Probe("isolate", tensors=tensors, status="failed", error=str(exc)))
        raise
    if on_probe:
        on_probe(Probe("isolate", tensors=tensors))
    return got


def _touched(graph: ModelGraph, name: str) -> list[str]:
    node = graph.node(name)
    return [t for t in list(node.input) + list(node.output) if t and t not in graph.initializers]


def _local_error(graph: ModelGraph, other: ModelGraph, name: str, ref: dict, got: dict, tol: Tolerance) -> LocalError:
    node = other.node(name)
    worst = None
    for out in node.output:
        if not out or out not in ref or isolated_name(out) not in got:
            continue
        d = diff_tensor(ref[out], got[isolated_name(out)], tol)
        metrics, diverges, new_nf = d.metrics, d.diverges, d.new_nonfinite
        score = (new_nf, diverges, metrics.get(tol.metric, 0.0) if metrics else np.inf)
        if worst is None or score > worst[0]:
            worst = (score, out, metrics, diverges, new_nf)
    inputs = tuple(ValueRange.of(t, ref[t]) for t in node.input if t in ref)
    if worst is None:
        return LocalError(name, node.op_type, graph.index_of.get(name, -1), "", {}, False, False, inputs)
    _, out, metrics, diverges, new_nf = worst
    return LocalError(name, node.op_type, graph.index_of.get(name, -1), out, metrics, diverges, new_nf, inputs, ValueRange.of(out, ref[out]))


def isolate_quantized(graph: ModelGraph, names: Sequence[str], feeds: Mapping[str, np.ndarray], reference: Runner, target: Target,
                      tolerance: Tolerance, other: ModelGraph | None = None, budget_bytes: int = 256 * 2**20,
                      on_probe: Callable[[Probe], None] | None = None) -> list[LocalError]:
    """Each node's own quantization error on an INT8 target: the node as the QDQ model computes it
    (Q/DQ of its inputs, the node, Q/DQ of its outputs, with the full model's calibrated scales) fed
    the reference values of its inputs. On ``ort:*:int8`` the same units also run with Q/DQ in
    float (``emulated_<metric>`` in the metrics): a node whose emulated error is small but whose
    real error is large loses accuracy in ONNX Runtime's integer kernel, not in quantization."""
    from aligner.backends.ort.runner import OrtRunner
    from aligner.quant.calib import report
    from aligner.quant.match import QdqMap, units_model
    from aligner.quant.quantize import quantize, session_target

    if other is not None and other is not graph:
        raise TargetRunError(f"{target}: INT8 targets quantize the model itself; compare a second graph on ort:cpu:fp32 instead.")
    qmap = QdqMap(graph, quantize(graph, target).model)
    kernel_of = {n: qmap.kernel_node(n) for n in names if n in graph.node_by_name}  # a folded Relu is computed by its producer's unit
    units = {k: u for k in dict.fromkeys(kernel_of.values()) if (u := qmap.unit(k)) is not None}
    order = sorted(units, key=graph.index_of.__getitem__)
    errors: list[LocalError] = []
    optimizes = backend_of(target).optimizes(target)
    groups = plan_groups(order, unit_bytes(graph, units, feeds, runs=2 if optimizes else 1), budget_bytes)
    for i, group in enumerate(groups):
        report(f"isolating quantized nodes ({len(order)} in {len(groups)} run(s))", i + 1, len(groups))
        chosen = [units[n] for n in group]
        wanted = [t for u in chosen for t in (*u.feeds.values(), *u.outputs.values())]
        ref = reference.run(dict(feeds), [t for t in dict.fromkeys(wanted) if t in reference.capturable])
        ref.update({t: feeds[t] for t in wanted if t in feeds})
        chosen = [u for u in chosen if all(t in ref for t in (*u.feeds.values(), *u.outputs.values()))]
        if not chosen:
            continue
        piece = units_model(qmap, chosen, ref)
        values = {t: ref[t] for u in chosen for t in u.feeds.values()}
        runs = {"": OrtRunner(piece, session_target(target), optimize=optimizes, label=f"{target} (isolated nodes)")}
        if optimizes:  # the runtime's integer kernels against Q/DQ in float: which of the two loses the accuracy
            runs["emulated_"] = OrtRunner(piece, Target.parse("emu:int8"), optimize=False, label="emu:int8 (isolated nodes)")
        got = _probed(lambda: {prefix: runner.run(values) for prefix, runner in runs.items()}, len(wanted), on_probe)
        for unit in chosen:
            own = _unit_error(graph, unit, ref, got, tolerance)
            errors += [replace(own, node=n, op_type=graph.node(n).op_type, index=graph.index_of[n]) if n != unit.node else own
                       for n, k in kernel_of.items() if k == unit.node]
    return sorted(errors, key=lambda e: e.index)


def unit_bytes(graph: ModelGraph, units: Mapping, feeds: Mapping[str, np.ndarray], runs: int = 2) -> dict[str, int]:
    """What isolating each unit of ``units`` holds for one sample of ``feeds``' shapes: the reference
    values of its inputs and outputs, and its outputs once more per target run (``runs``: the integer
    kernels, Q/DQ in float). From shape inference; a tensor of unknown size counts 4 MB. A unit's feed
    shared with another unit of the same group is counted in both (a bound, not an exact sum)."""
    from aligner.compare.layerwise import UNKNOWN_SIZE, estimate_sizes

    sizes = {**estimate_sizes(graph, dict(feeds)), **{k: np.asarray(v).nbytes for k, v in feeds.items()}}

    def size(t: str) -> int:
        return sizes.get(t, UNKNOWN_SIZE)

    return {n: sum(size(t) for t in set(u.feeds.values())) + (1 + runs) * sum(size(t) for t in set(u.outputs.values()))
            for n, u in units.items()}


def _unit_error(graph: ModelGraph, unit, ref: dict, got: dict, tol: Tolerance) -> LocalError:
    node = graph.node(unit.node)
    worst = None
    for original in unit.outputs.values():
        d = diff_tensor(ref[original], got[""][isolated_name(original)], tol)
        metrics = dict(d.metrics, channel_rel_l2=worst_channel_rel_l2(ref[original], got[""][isolated_name(original)]))
        if "emulated_" in got:
            emulated = diff_tensor(ref[original], got["emulated_"][isolated_name(original)], tol)
            metrics[f"emulated_{tol.metric}"] = emulated.metrics.get(tol.metric, float("nan"))
        score = (d.new_nonfinite, d.diverges, d.metrics.get(tol.metric, 0.0))
        if worst is None or score > worst[0]:
            worst = (score, original, metrics, d.diverges, d.new_nonfinite)
    inputs = tuple(ValueRange.of(t, ref[t]) for t in dict.fromkeys(unit.feeds.values()))
    if worst is None:
        return LocalError(unit.node, node.op_type, graph.index_of[unit.node], "", {}, False, False, inputs)
    _, out, metrics, diverges, new_nf = worst
    return LocalError(unit.node, node.op_type, graph.index_of[unit.node], out, metrics, diverges, new_nf, inputs, ValueRange.of(out, ref[out]))


def worst_channel_rel_l2(ref: np.ndarray, test: np.ndarray, floor: float = 1e-3, min_size: int = 16) -> float:
    """The largest rel_l2 of one channel (axis 1, or the last axis; channels of at least ``min_size``
    values) among channels whose norm is at least ``floor`` of the largest channel's: per-tensor
    quantization's typical failure, a channel of small values sharing one scale with large ones (an
    outlier channel, scores beside box coordinates), which the whole tensor's rel_l2 hides."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    if ref.ndim < 2 or ref.shape != test.shape or ref.dtype.kind != "f":
        return 0.0
    worst = 0.0
    for axis in dict.fromkeys((1, ref.ndim - 1)):
        if ref.size // max(ref.shape[axis], 1) < min_size:
            continue
        r, t = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1), np.moveaxis(test, axis, 0).reshape(ref.shape[axis], -1)
        finite = np.isfinite(r).all(axis=1) & np.isfinite(t).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(r), r, 0), axis=1)
        keep = finite & (norms >= floor * max(float(norms.max(initial=0.0)), 1e-30)) & (norms > 0)
        if keep.any():
            worst = max(worst, float(np.max(np.linalg.norm(t[keep] - r[keep], axis=1) / norms[keep])))
    return worst


def kernel_or_quantization(error: LocalError, tol: Tolerance) -> str:
    """For a node of an INT8 target: 'kernel' when its error with Q/DQ in float is within ``tol`` but
    its error on the integer kernel is not (the kernel loses it, e.g. 16-bit accumulation saturating
    on CPUs without VNNI: try reduce_range=1), 'quantization' when both exceed it, else ''."""
    emulated = error.metrics.get(f"emulated_{tol.metric}")
    if emulated is None or not error.diverges:
        return ""
    return "quantization" if tol.exceeded({tol.metric: emulated, "max_abs": error.metrics.get("max_abs", 0.0)}) else "kernel"


__all__ = ["isolate", "isolate_quantized", "kernel_or_quantization", "unit_bytes", "worst_channel_rel_l2"]
