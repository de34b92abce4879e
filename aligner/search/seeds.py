"""The precision search's seeds: every float activation's range over the samples, and the nodes
that cannot run in the low precision on them (a value beyond its max, a divisor that flushes to 0),
with the evidence; the search starts from these pins."""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from aligner.backends import reference_runner
from aligner.compare.layerwise import estimate_sizes, plan_groups
from aligner.graph.model import ModelGraph
from aligner.graph.precision import is_fp32, node_typing
from aligner.inputs import Feeds
from aligner.limits import FP16_MIN_SUBNORMAL, LOW_MAX
from aligner.search.verdict import ValueRange


def value_ranges(graph: ModelGraph, samples: Sequence[Feeds], budget_bytes: int = 256 * 2**20) -> dict[str, ValueRange]:
    """Range of every float activation over all samples (reference, in memory-bounded groups)."""
    runner = reference_runner(graph)
    names = [n for n in graph.activations() if is_fp32(graph, n)]
    out: dict[str, ValueRange] = {}
    for feeds in samples:
        for group in plan_groups(names, estimate_sizes(graph, feeds), budget_bytes):
            values = runner.run(feeds, group)
            for name in group:
                r = ValueRange.of(name, values.pop(name))
                out[name] = r if name not in out else _merge(out[name], r)
        for name, value in feeds.items():
            out[name] = ValueRange.of(name, value)
    return out


def _merge(a: ValueRange, b: ValueRange) -> ValueRange:
    return ValueRange(a.tensor, min(a.min, b.min), max(a.max, b.max), max(a.max_abs, b.max_abs), min(a.min_abs_nonzero, b.min_abs_nonzero))


def seed_pins(graph: ModelGraph, ranges: dict[str, ValueRange], precision: str) -> dict[str, str]:
    """Nodes that cannot run in ``precision`` on this data, with the evidence, in topological order."""
    limit = LOW_MAX[precision]
    params = {name: ValueRange.of(name, onnx.numpy_helper.to_array(t)) for name, t in graph.initializers.items() if is_fp32(graph, name)}
    seeds: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type == "Constant":
            continue
        typing = node_typing(node, graph.opset, precision)
        for out in node.output:
            r = ranges.get(out)
            if r is not None and r.max_abs > limit:
                seeds[node.name] = f"writes {out!r} with values up to {r.max_abs:.3g}, beyond {precision.upper()} max {limit:g}"
                break
        if node.name in seeds:
            continue
        for i, name in enumerate(node.input):
            r = ranges.get(name) or params.get(name)
            if r is None or i in typing.fp32_inputs:
                continue
            if r.max_abs > limit:
                what = "weight" if name in params else "input"
                seeds[node.name] = f"reads {what} {name!r} with values up to {r.max_abs:.3g}, beyond {precision.upper()} max {limit:g}"
                break
            flushes = precision == "fp16" and 0 < r.min_abs_nonzero < FP16_MIN_SUBNORMAL
            if flushes and ((node.op_type == "Div" and i == 1) or node.op_type in ("Reciprocal", "Log", "Sqrt")):
                seeds[node.name] = f"{node.op_type} of {name!r} whose values go down to {r.min_abs_nonzero:.3g}, which flush to 0 in FP16"
                break
    return seeds


__all__ = ["seed_pins", "value_ranges"]
