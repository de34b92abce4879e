"""Capture every tensor in one pass per side: the model cut into consecutive segments.

Capturing in groups that each re-run the whole model keeps memory at one group per side but costs
one session and one full run per group on both sides (DETR-R50: 15 groups, ~5× Polygraphy's single
``mark all`` pass). Here the topological order is cut into segments sized by the same budget; each
segment is a model of its own whose inputs are the tensors crossing its first cut (carried from the
previous segment) and whose outputs are its tensors plus those crossing its last cut. Each side
runs every node once, builds sessions whose sizes add up to one model's, and holds one segment's
tensors plus what crosses the cut.

Where it applies (``layerwise._segmentable``): the same graph on both sides, on the FP16/BF16
emulator and on ONNX Runtime in FP32/TF32 — targets whose segments compute exactly what the whole
model computes. A cut must not split what the target deploys as one kernel, so on a target that
captures ``boundaries`` only cuts whose crossing tensors all exist in the deployed graph are used.
The target's graph outputs from the last segment are checked against its uncaptured run; when they
moved, the caller falls back to whole-model groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from aligner.graph.model import ModelGraph, _node_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    start: int  # first node (position in the compute order)
    stop: int  # one past the last node
    names: tuple[str, ...]  # tensors to compare that its nodes write
    inputs: tuple[str, ...]  # tensors crossing ``start`` (carried in; graph inputs included)
    carry: tuple[str, ...]  # tensors crossing ``stop`` (carried out; the graph outputs at the end)


class Cuts:
    """Where the compute order can be cut, and what crosses each cut."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
        self.order = [n for n in graph.nodes if n.op_type != "Constant"]
        position = {n.name: i for i, n in enumerate(self.order)}
        n = len(self.order)
        self.produced: dict[str, int] = {}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.order):
            for out in node.output:
                if out:
                    self.produced[out] = i
        for name in graph.input_names:
            self.produced[name] = -1
        for node in self.order:
            for t in _node_inputs(node):
                if t in self.produced:
                    self.last_use[t] = max(self.last_use.get(t, -1), position[node.name])
        for out in graph.output_names:
            self.last_use[out] = n
        self.n = n

    def crossing(self, cut: int) -> list[str]:
        """Tensors written before ``cut`` (graph inputs included) and read at or after it."""
        return [t for t, p in self.produced.items() if p < cut <= self.last_use.get(t, -2)]


def plan_segments(graph: ModelGraph, names: Sequence[str], sizes: dict[str, int], budget: int,
                  allowed: Callable[[list[str]], bool] = lambda crossing: True, unknown: int = 4 * 2**20,
                  cuts: Cuts | None = None) -> list[Segment]:
    """Segments covering the whole order, each writing about ``budget`` bytes of ``names``; a cut is
    used only if ``allowed(tensors crossing it)``."""
    cuts = cuts or Cuts(graph)
    wanted = set(names)
    segments, start, used, current = [], 0, 0, []
    for i, node in enumerate(cuts.order):
        outs = [o for o in node.output if o in wanted]
        current += outs
        used += sum(sizes.get(o, unknown) for o in outs)
        cut = i + 1
        if cut < cuts.n and used >= budget:
            crossing = cuts.crossing(cut)
            if allowed(crossing):
                segments.append(Segment(start, cut, tuple(current), tuple(cuts.crossing(start)), tuple(crossing)))
                start, used, current = cut, 0, []
    segments.append(Segment(start, cuts.n, tuple(current), tuple(cuts.crossing(start)), tuple(cuts.graph.output_names)))
    return segments


def segment_model(graph: ModelGraph, segment: Segment, cuts: Cuts | None = None) -> onnx.ModelProto:
    """The standalone model of ``segment``: its nodes, the Constants and initializers they read, the
    crossing tensors as inputs, its tensors and the next crossing as outputs. Built field by field,
    so only this segment's weights are copied (the segments together copy the model once)."""
    cuts = cuts or Cuts(graph)
    nodes = cuts.order[segment.start:segment.stop]
    reads = set().union(*(_node_inputs(n) for n in nodes)) if nodes else set()
    constants = [n for n in graph.nodes if n.op_type == "Constant" and any(o in reads for o in n.output)]
    source = graph.model
    g = onnx.GraphProto(name=f"{source.graph.name}[{segment.start}:{segment.stop}]")
    g.node.extend(constants + nodes)
    g.initializer.extend(graph.initializers[name] for name in sorted(reads) if name in graph.initializers)
    for name in segment.inputs:
        if name in reads:
            g.input.append(_value_info(graph, name))
    for name in _written(segment, cuts):
        g.output.append(_value_info(graph, name))
    model = onnx.ModelProto(ir_version=source.ir_version, producer_name="aligner-segment", graph=g)
    model.opset_import.extend(source.opset_import)
    model.functions.extend(source.functions)
    model.metadata_props.extend(source.metadata_props)  # e.g. a build's precision stamp: runners take it as built
    return model


def _written(segment: Segment, cuts: Cuts) -> list[str]:
    """What ``segment`` writes and hands on: its tensors, and those crossing its end that it produces
    (the others pass through from earlier segments)."""
    inside = [t for t in segment.carry if segment.start <= cuts.produced.get(t, -1) < segment.stop]
    return list(dict.fromkeys([*segment.names, *inside]))


def _value_info(graph: ModelGraph, name: str) -> onnx.ValueInfoProto:
    info = graph.tensors.get(name)
    if info is None or not info.elem_type:
        return helper.make_empty_tensor_value_info(name)
    return helper.make_tensor_value_info(name, info.elem_type, None if info.shape is None else list(info.shape))


def run_segments(graph: ModelGraph, segments: Sequence[Segment], makers: Sequence[Callable[[ModelGraph], object]],
                 feeds: dict[str, np.ndarray], cuts: Cuts | None = None) -> Iterator[list[dict[str, np.ndarray]]]:
    """For each segment in order, each side's values of its tensors (one dict per maker), computed
    from what that side's previous segments carried; the last also holds the graph outputs. Each
    segment's model is built once and run by every side in turn (both sides compute on every core:
    running them at once only made them contend)."""
    cuts = cuts or Cuts(graph)
    carried = [dict(feeds) for _ in makers]
    for segment in segments:
        sub = ModelGraph(segment_model(graph, segment, cuts))
        written = _written(segment, cuts)
        out = []
        for side, make in enumerate(makers):
            runner = make(sub)
            values = runner.run({k: carried[side][k] for k in sub.input_names}, written)
            del runner
            # a graph output that no compute node writes (a Constant's, an initializer) is carried by nobody: left out
            carried[side] = {k: values[k] if k in values else carried[side][k] for k in segment.carry
                             if k in values or k in carried[side]} | dict(feeds)
            out.append({k: values[k] if k in values else carried[side][k] for k in dict.fromkeys([*segment.names, *segment.carry])
                        if k in values or k in carried[side]})
            del values
        yield out


__all__ = ["Cuts", "Segment", "plan_segments", "run_segments", "segment_model"]
