"""Isolation: each node's own error, from one target run of a decoupled graph per group.

Every chosen node reads the *reference* values of its inputs (graph inputs of the decoupled
graph) and writes renamed outputs, so the difference to the reference output is the node's own
error on the target; error it would inherit from upstream does not count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aligner.backends import Runner, make_runner
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
        runner = make_runner(piece, target.with_pins([n for n in group if n in pinned]))
        try:
            got = runner.run(values)
        except TargetRunError as exc:
            if on_probe:
                on_probe(Probe("isolate", tensors=len(outputs), status="failed", error=str(exc)))
            raise
        if on_probe:
            on_probe(Probe("isolate", tensors=len(outputs)))
        for name in group:
            errors.append(_local_error(graph, other, name, ref, got, tolerance))
        del ref, values, got
    return errors


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


__all__ = ["isolate"]
