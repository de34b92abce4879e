"""INT8 in the pin search: a pin is a node kept in float (excluded from ONNX Runtime's quantizer).

What differs from FP16/BF16 is only how the search starts: the candidates are the nodes the
quantizer quantizes; they are ranked by their own quantization error (isolated on the target);
the shortest passing prefix of that ranking is found by doubling then halving; the quantizer
settings may first be swept. Trials, minimisation and the plan are :mod:`aligner.search.precision`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from aligner.backends import reference_runner
from aligner.backends.target import Target
from aligner.compare.metrics import HIGHER_IS_BETTER
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds


def quantizable(graph: ModelGraph, target: Target) -> list[str]:
    """Nodes the quantizer quantizes for ``target`` (a Q/DQ on an input or output), topological order:
    what keeping a node in float can change."""
    from aligner.quant.match import QdqMap
    from aligner.quant.quantize import quantize

    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = set(QDQRegistry) | set(QLinearOpsRegistry)  # what the quantizer quantizes (a Shape reading a DQ output is not)
    qmap = QdqMap(graph, quantize(graph, target, exclude=()).model)
    return [n.name for n in graph.nodes if n.op_type in ops and n.name in qmap.nodes and (u := qmap.unit(n.name)) is not None
            and len(u.nodes) > 1]


def quantization_seeds(graph: ModelGraph, target: Target, feeds: Feeds, universe: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Nodes whose own quantization error (isolated on ``target``, reference inputs) exceeds the INT8
    tolerance, with the evidence (a node whose error is the integer kernel's says so), and every
    node of ``universe`` ranked by that error, largest first (how the search grows past the seeds)."""
    from aligner.compare.tolerance import tolerance_for
    from aligner.search.isolate import isolate, kernel_or_quantization

    tol = tolerance_for(target)
    errors = isolate(graph, list(universe), feeds, reference_runner(graph), target.with_pins(()), tol)
    ranked = sorted((e for e in errors if e.node in set(universe) and e.metrics), key=lambda e: rank_key(e, tol.metric), reverse=True)
    own = [e for e in ranked if e.diverges]
    seeds = {}
    for e in own:
        why = f"own quantization error {tol.metric} {e.metrics.get(tol.metric, math.nan):.3g} (isolated on {target.base}, tolerance {tol.threshold:g})"
        if kernel_or_quantization(e, tol) == "kernel":
            why += (f"; with Q/DQ in float it is only {e.metrics.get('emulated_' + tol.metric, math.nan):.3g}: ONNX Runtime's integer "
                    "kernel loses it, not quantization (try reduce_range=1)")
        seeds[e.node] = why
    return seeds, [e.node for e in ranked]


def rank_key(error, metric: str) -> tuple[float, float]:
    """Rank key: the worst channel's rel_l2 (what per-tensor quantization destroys and a whole-tensor
    metric hides), then the tolerance metric."""
    value = error.metrics.get(metric, 0.0)
    value = math.inf if math.isnan(value) else value
    return error.metrics.get("channel_rel_l2", 0.0), -value if metric in HIGHER_IS_BETTER else value


def quantizer_settings(graph: ModelGraph, target: Target, samples: Sequence[Feeds], accept, sweep: bool) -> tuple[Target, dict]:
    """The INT8 target to search on (the sweep's best setting when ``sweep``) and what to record in the plan."""
    from aligner.quant.quantize import QuantSettings, calibration_of

    record: dict = {"quantizer": "onnxruntime.quantization.quantize_static (QDQ)"}
    if sweep:
        from aligner.quant.sweep import sweep_settings

        metric = next((m for m, _, _ in accept.bounds), "rel_l2")
        target, points = sweep_settings(graph, target, samples, metric)
        record["sweep"] = [p.to_dict() for p in points]
    record["settings"] = QuantSettings.of(target).to_dict()
    record["calibration"] = calibration_of(graph, target).to_dict()
    return target, record


def ranked_prefix(seeds: list[str], check: Callable, ranking: Sequence[str]) -> list[str]:
    """The shortest prefix of the ranking (the seeds first, then every node by isolated quantization
    error) whose nodes kept in float pass: lengths doubling from the seeds' until one passes, then
    halving the gap; about 2*log2(N) trials where growing one node per trial would cost one per node.
    The minimisation that follows proves each kept node necessary, whatever the ranking got wrong."""
    order = list(dict.fromkeys([*seeds, *ranking]))
    if check(frozenset(), "pure").passed:
        return []
    failing, passing, k = 0, None, max(1, len(seeds))
    while passing is None and failing < len(order):
        k = min(k, len(order))
        if check(frozenset(order[:k]), "rank").passed:
            passing = k
        else:
            failing, k = k, 2 * k
    if passing is None:
        return order  # even all of them fail: growing says so
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if check(frozenset(order[:mid]), "rank").passed:
            passing = mid
        else:
            failing = mid
    return order[:passing]


__all__ = ["quantizable", "quantization_seeds", "quantizer_settings", "rank_key", "ranked_prefix"]
