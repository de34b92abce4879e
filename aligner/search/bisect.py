"""``bisect``: the first divergent node, its root cause, and where NaN/inf start.

Strategies (see :mod:`aligner.search.frontier` for the search itself):
* ``all``: every tensor captured once per side (in memory-bounded groups);
* ``frontier``: only the tensors crossing a cut, halving the range: ⌈log2 N⌉+1 target runs;
* ``isolate``: every node's own error from decoupled runs (plus one run of the graph outputs);
* ``auto``: ``all`` when every tensor fits one capture group, else ``frontier``; then the first
  divergent node and its neighbourhood are isolated to name the root cause.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from aligner.backends import Runner, make_runner, parse_target, reference_runner
from aligner.backends.target import Target
from aligner.compare.layerwise import diff_row, estimate_sizes, plan_groups
from aligner.compare.results import TensorDiff
from aligner.compare.tolerance import Tolerance, default_tolerance
from aligner.errors import InputError, TargetRunError
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.inputs import Feeds, make_inputs, validate_feeds
from aligner.search.explain import explain, node_difference, root_cause
from aligner.search.frontier import bisect_cuts, frontier, spans
from aligner.search.isolate import isolate
from aligner.search.verdict import BisectResult, LocalError, NonfiniteOrigin, Probe, nonfinite_reason

log = logging.getLogger(__name__)

Strategy = Literal["auto", "all", "frontier", "isolate"]
STRATEGIES = ("auto", "all", "frontier", "isolate")
Progress = Callable[[str, int, int], None]


@dataclass
class _Run:
    """State of one bisect: both sides, the probes so far, every tensor diffed so far."""

    graph: ModelGraph
    other: ModelGraph
    feeds: Feeds
    target: Target
    tol: Tolerance
    ref: Runner
    tgt: Runner
    order: list[str]  # compute nodes of the reference, topological
    progress: Progress | None
    probes: list[Probe] = field(default_factory=list)
    diffs: dict[str, TensorDiff] = field(default_factory=dict)

    def capture(self, names: list[str], phase: str, cut: int | None = None) -> list[TensorDiff]:
        """One probe: ``names`` captured on both sides and diffed."""
        names = [n for n in names if n in self.tgt.capturable and n in self.ref.capturable]
        node = self.order[cut - 1] if cut else ""
        ref_values = self.ref.run(self.feeds, names)
        try:
            tgt_values = self.tgt.run(self.feeds, names)
        except TargetRunError as exc:
            self.probes.append(Probe(phase, len(names), cut, node, status="failed", error=str(exc)))
            raise
        rows = [diff_row(self.graph, n, ref_values.pop(n), tgt_values.pop(n), self.tol) for n in names]
        self.diffs.update((r.tensor, r) for r in rows)
        self.probes.append(Probe(phase, len(names), cut, node, any(r.diverges for r in rows), any(r.new_nonfinite for r in rows)))
        if self.progress:
            self.progress(phase, len(self.probes), 0)
        return rows


def bisect(
    model: ModelGraph | str | Path,
    target: str | Target = "emu:fp16",
    reference: str | Target = "ort:cpu:fp32",
    target_model: ModelGraph | str | Path | None = None,
    feeds: Feeds | None = None,
    strategy: Strategy = "auto",
    tolerance: Tolerance | None = None,
    fp32_nodes: Iterable[str] = (),
    capture_budget_mb: int = 512,
    window: int = 16,
    save_repro: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> BisectResult:
    """Find where ``target`` (or ``target_model``) starts to diverge from ``reference`` and why."""
    if strategy not in STRATEGIES:
        raise InputError(f"Unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}.")
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    other = graph if target_model is None else (target_model if isinstance(target_model, ModelGraph) else ModelGraph.load(target_model))
    tgt_target = parse_target(target) if isinstance(target, str) else target
    ref_target = parse_target(reference) if isinstance(reference, str) else reference
    if save_repro is not None:
        from aligner.search.repro import check_repro_dir

        check_repro_dir(Path(save_repro), force)
    feeds = validate_feeds(graph, feeds) if feeds is not None else make_inputs(graph)
    fp32_nodes = list(fp32_nodes)
    tol = tolerance or default_tolerance(tgt_target.precision if target_model is None or tgt_target.runtime == "emu" else "fp32")
    run = _Run(graph, other, feeds, tgt_target, tol, reference_runner(graph, ref_target), make_runner(other, tgt_target, fp32_nodes),
               [n.name for n in graph.nodes if n.op_type != "Constant"], progress)
    sizes = estimate_sizes(graph, feeds)
    budget = capture_budget_mb * 2**20 // 2
    used = _resolve(strategy, tgt_target, graph, sizes, budget)
    label = str(tgt_target) if target_model is None else f"{tgt_target} ({Path(str(other.path)).name})"
    common = dict(model=str(graph.path or "<in-memory>"), target=label, reference=str(ref_target), strategy=strategy,
                  strategy_used=used, nodes=len(run.order))
    try:
        first, nf_node, outputs_diverge = _locate(run, used, budget)
        names = _neighbourhood(run, first.node if first else None, nf_node, window) if used != "isolate" else run.order
        locals_ = isolate(graph, names, feeds, run.ref, tgt_target, tol, other, fp32_nodes, sizes, budget, run.probes.append)
    except TargetRunError as exc:
        return BisectResult(**common, first_divergent=None, root_cause=None, nonfinite_origin=None, local_errors=(),
                            probes=tuple(run.probes), explanation=f"The target failed, so nothing was judged: {exc}",
                            outputs_diverge=False, failed=str(exc))
    by_node = {e.node: e for e in locals_}
    if used == "isolate":
        first_local = next((e for e in locals_ if e.diverges or e.new_nonfinite), None)
        cause_node = first_local.node if first_local else None
        nf_node = next((e.node for e in locals_ if e.new_nonfinite), None)
    else:
        cause_node = first.node if first else None
    cause = None
    if cause_node is not None:
        cause = root_cause(run, cause_node, by_node.get(cause_node), locals_, node_difference(graph, other, cause_node))
    origin = _origin(run, nf_node, by_node.get(nf_node) if nf_node else None)
    ranked = tuple(sorted(locals_, key=lambda e: _score(e, tol), reverse=True)[:50])
    result = BisectResult(**common, first_divergent=first, root_cause=cause, nonfinite_origin=origin, local_errors=ranked,
                          probes=tuple(run.probes), explanation="", outputs_diverge=outputs_diverge)
    if save_repro is not None and cause is not None:
        from aligner.search.repro import write_repro

        result = replace(result, repro=write_repro(run, cause, locals_, Path(save_repro), fp32_nodes))
    return replace(result, explanation=explain(result, tol))


def _resolve(strategy: str, target: Target, graph: ModelGraph, sizes: dict[str, int], budget: int) -> str:
    if strategy != "auto":
        return strategy
    total = sum(sizes.get(t, 4 * 2**20) for t in graph.activations())
    return "all" if target.runtime in ("emu", "ort") and total <= budget else "frontier"


def _locate(run: _Run, strategy: str, budget: int) -> tuple[TensorDiff | None, str | None, bool]:
    """(first divergent tensor, first node making NaN/inf, whether graph outputs diverge)."""
    n = len(run.order)
    lives = spans([(sorted(_node_inputs(run.graph.node(x))), list(run.graph.node(x).output)) for x in run.order], run.graph.output_names)
    if strategy == "all":
        sizes = estimate_sizes(run.graph, run.feeds)
        names = run.graph.activations()
        for group in plan_groups(names, sizes, budget):
            run.capture(group, "all")
        rows = [run.diffs[t] for t in names if t in run.diffs]
        first = next((r for r in rows if r.diverges), None)
        nf = next((r.node for r in rows if r.new_nonfinite), None)
        outputs = [run.diffs[o] for o in run.graph.output_names if o in run.diffs]
        return first, nf, any(r.diverges for r in outputs)

    if strategy == "isolate":  # isolation judges nodes; one run says whether the outputs diverge
        rows = run.capture(frontier(lives, n), "outputs", n)
        return None, None, any(r.diverges for r in rows)
    known: dict[int, bool] = {}
    known_nf: dict[int, bool] = {}

    def probe(cut: int) -> bool:
        rows = run.capture(frontier(lives, cut), "outputs" if cut == n else "frontier", cut)
        known_nf[cut] = any(r.new_nonfinite for r in rows)
        return any(r.diverges for r in rows)

    j = bisect_cuts(n, probe, known)
    outputs_diverge = known.get(n, False)
    if j is None:
        return None, None, outputs_diverge
    node = run.graph.node(run.order[j])
    first = next((run.diffs[o] for o in node.output if o in run.diffs and run.diffs[o].diverges), None)
    nf_node = None
    if any(known_nf.values()):
        for cut, diverged in known.items():
            if not diverged:
                known_nf[cut] = False
        top = min(c for c, v in known_nf.items() if v)
        k = bisect_cuts(n, lambda c: probe(c) and known_nf[c], known_nf, top)
        nf_node = run.order[k] if k is not None else None
    return first, nf_node, outputs_diverge


def _neighbourhood(run: _Run, first: str | None, nf_node: str | None, window: int) -> list[str]:
    """The first divergent node, its ancestors among the ``window`` nodes before it, and the
    node where NaN/inf start."""
    out = set()
    for start in (first, nf_node):
        if start is None:
            continue
        lo = run.graph.index_of[start] - window
        stack = [start]
        while stack:
            name = stack.pop()
            if name in out or run.graph.index_of[name] < lo:
                continue
            out.add(name)
            for t in _node_inputs(run.graph.node(name)):
                src = run.graph.producer.get(t)
                if src is not None and src.op_type != "Constant":
                    stack.append(src.name)
    return sorted(out, key=run.graph.index_of.__getitem__)


def _origin(run: _Run, node: str | None, local: LocalError | None) -> NonfiniteOrigin | None:
    if node is None:
        return None
    n = run.graph.node(node)
    out = next((o for o in n.output if o in run.diffs and run.diffs[o].new_nonfinite), n.output[0])
    inputs = local.inputs if local else ()
    reason = nonfinite_reason(n.op_type, inputs, local.output if local else None, run.target.precision)
    if local is not None and not local.new_nonfinite:
        reason += " (run alone on reference inputs it stays finite: its inputs already carried the error)"
    return NonfiniteOrigin(node, n.op_type, run.graph.index_of[node], out, inputs, reason)


def _score(e: LocalError, tol: Tolerance) -> tuple:
    value = e.metrics.get(tol.metric, 0.0) if e.metrics else math.inf
    value = value if not np.isnan(value) else math.inf
    return (e.new_nonfinite, e.diverges, value)


__all__ = ["STRATEGIES", "Strategy", "bisect"]
