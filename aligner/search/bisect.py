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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from aligner.backends import backend_of, make_runner, reference_runner
from aligner.backends.resolve import target_for_model
from aligner.backends.target import REFERENCE, Target
from aligner.compare.capture import Observer
from aligner.compare.layerwise import UNKNOWN_SIZE, check_budget, estimate_sizes, plan_groups, target_label
from aligner.compare.results import TensorDiff
from aligner.compare.tolerance import Tolerance, tolerance_for
from aligner.errors import AlignerError, InputError, TargetRunError
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.inputs import Feeds, make_inputs, validate_feeds
from aligner.search.executor import Executor, Workers
from aligner.search.workers import make_executor
from aligner.search.explain import explain, node_difference, root_cause
from aligner.search.frontier import bisect_cuts, frontier, spans
from aligner.search.isolate import isolate
from aligner.search.probes import BisectRun, ProbeJob, Progress
from aligner.search.verdict import BisectResult, LocalError, NonfiniteOrigin, Probe, nonfinite_reason

log = logging.getLogger(__name__)

Strategy = Literal["auto", "all", "frontier", "isolate"]
STRATEGIES = ("auto", "all", "frontier", "isolate")


def bisect(
    model: ModelGraph | str | Path,
    target: str | Target | None = None,
    reference: str | Target = REFERENCE,
    target_model: ModelGraph | str | Path | None = None,
    feeds: Feeds | None = None,
    strategy: Strategy = "auto",
    tolerance: Tolerance | None = None,
    capture_budget_mb: float = 512,
    window: int = 16,
    sweep_runs: int | None = None,
    save_repro: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    workers: Workers | Executor = 1,
) -> BisectResult:
    """Find where ``target`` (or ``target_model``) starts to diverge from ``reference`` and why.

    Every strategy answers the same question with the same tolerance as :func:`aligner.compare`
    and names the same first divergent node; they differ in how many tensors each target run
    captures. ``sweep_runs`` caps the frontier strategy's search for divergences that do not
    reach the outputs (None: as many runs as the capture budget needs, which makes it complete).

    ``workers`` (a number of local processes, ``"ray"``, ``"ray://HOST:PORT"`` or an executor:
    :mod:`aligner.search.executor`) runs the probes that are separate runs at once: the frontier
    search probes the next levels of its binary search ahead (a k-ary search that asks the cuts the
    binary search asks), and the capture groups of ``all`` and of the sweep run side by side. The
    first divergent node, the root cause and the NaN/inf origin are the serial ones; the probe
    list may differ (a probe run ahead carries no extra tensors for the sweep).
    """
    if strategy not in STRATEGIES:
        raise InputError(f"Unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}.")
    if not isinstance(window, int) or window < 0:
        raise InputError(f"window must be a whole number of nodes >= 0; got {window!r}.")
    if sweep_runs is not None and (not isinstance(sweep_runs, int) or sweep_runs < 0):
        raise InputError(f"sweep runs must be a whole number >= 0; got {sweep_runs!r}.")
    check_budget(capture_budget_mb)
    target, model = target_for_model(target, model, second_graph=target_model is not None)  # a built model: its sidecar's target
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    other = graph if target_model is None else (target_model if isinstance(target_model, ModelGraph) else ModelGraph.load(target_model))
    tgt_target, ref_target = Target.parse(target), Target.parse(reference)
    if save_repro is not None:
        from aligner.search.repro import check_repro_dir

        check_repro_dir(Path(save_repro), force)
    feeds = validate_feeds(graph, feeds) if feeds is not None else make_inputs(graph)
    tol = tolerance or tolerance_for(tgt_target, ref_target)
    try:
        tgt_runner = make_runner(other, tgt_target)
        observer = Observer.of(tgt_runner, other, feeds)
    except TargetRunError as exc:  # building the target, its uncaptured runs or its deployed graph already fail
        return _failed(graph, other, feeds, tgt_target, ref_target, strategy, tol, exc, progress,
                       None if save_repro is None else Path(save_repro))
    executor, own = (make_executor(workers), True) if isinstance(workers, (int, str)) else (workers, False)
    if executor.workers > 1:
        executor.start(ProbeJob(graph, other, feeds, tgt_target, ref_target, tol))
    run = BisectRun(graph, other, feeds, tgt_target, tol, reference_runner(graph, ref_target), tgt_runner,
               [n.name for n in graph.nodes if n.op_type != "Constant"], progress, observer,
               executor=executor if executor.workers > 1 else None)
    observer.reference = lambda: run.ref.run(feeds)  # asked once, only if a capture run moves the target's outputs
    sizes = estimate_sizes(graph, feeds)
    budget = int(capture_budget_mb * 2**20) // 2
    used = _resolve(strategy, tgt_target, graph, sizes, budget)
    label = str(tgt_target) if target_model is None else target_label(tgt_target, other)
    common = dict(model=str(graph.path or "<in-memory>"), target=label, reference=str(ref_target), strategy=strategy,
                  strategy_used=used, nodes=len(run.order), tolerance=tol)
    try:
        found = _locate(run, used, budget, sweep_runs)
        first, nf_node = found.first, found.nonfinite_node
        names = _neighbourhood(run, first.node if first else None, nf_node, window) if used != "isolate" else run.order
        locals_ = isolate(graph, names, feeds, run.ref, tgt_target, tol, other, sizes, budget, run.probes.append)
    except TargetRunError as exc:
        return BisectResult(**common, first_divergent=None, root_cause=None, nonfinite_origin=None, local_errors=(),
                            probes=tuple(run.probes), explanation=f"The target failed, so nothing was judged: {exc}",
                            outputs_diverge=False, failed=str(exc))
    finally:
        if own:
            executor.close()
    if first is not None:
        locals_ = _kernel_error(run, first.node, locals_)
    by_node = {e.node: e for e in locals_}
    cause = None
    if first is not None:
        cause = root_cause(run, first.node, by_node.get(first.node), locals_, node_difference(graph, other, first.node))
    origin = _origin(run, nf_node, by_node.get(nf_node) if nf_node else None)
    ranked = tuple(sorted(locals_, key=lambda e: _score(e, tol), reverse=True)[:50])
    notes = list(found.notes)
    own = [e.node for e in locals_ if e.diverges and (first is None or run.graph.index_of.get(e.node, -1) != first.index)]
    if own and first is None:
        notes.append(f"{len(own)} node(s) have an own (isolated) error beyond the tolerance that does not reach any "
                     f"tensor of the full run, e.g. {', '.join(own[:3])}")
    result = BisectResult(**common, first_divergent=first, root_cause=cause, nonfinite_origin=origin, local_errors=ranked,
                          probes=tuple(run.probes), explanation="", outputs_diverge=found.outputs_diverge,
                          checked=found.checked, notes=tuple(notes))
    if save_repro is not None and cause is not None:
        from aligner.search.repro import write_repro

        result = replace(result, repro=write_repro(run, cause, locals_, Path(save_repro), list(tgt_target.pins)))
    return replace(result, explanation=explain(result, tol))


def _kernel_error(run: BisectRun, node: str, locals_: list[LocalError]) -> list[LocalError]:
    """``locals_`` with ``node``'s own error measured as the target deploys it, where ``node`` run alone
    shows none but a fused kernel of the target computes it with other nodes: the kernel's nodes as
    one piece (:func:`aligner.search.isolate.isolate_kernel`). A fault can exist only inside a fused
    kernel (OpenVINO's bf16 FullyConnected reading a low-precision input its epilogue then cancels)."""
    own = next((e for e in locals_ if e.node == node), None)
    deployed = run.observer.deployed
    if (own is not None and own.diverges) or deployed is None or node not in deployed.kernel_of or run.target.is_quantized:
        return locals_
    kernel = next((k for k in deployed.kernels if k.name == deployed.kernel_of[node]), None)
    if kernel is None or len(kernel.originals) < 2:
        return locals_
    from aligner.search.isolate import isolate_kernel

    try:
        found = isolate_kernel(run.graph, kernel, node, run.feeds, run.ref, run.target, run.tol, run.other, run.probes.append)
    except (TargetRunError, ValueError) as exc:  # the piece does not run alone: the per-node answer stands
        log.info("could not run the fused kernel %s as one piece: %s", kernel.name, exc)
        return locals_
    if found is None or not found.diverges:
        return locals_
    return [found if e.node == node else e for e in locals_] + ([] if own is not None else [found])


def _failed(graph: ModelGraph, other: ModelGraph, feeds: Feeds, target: Target, reference: Target, strategy: str, tol: Tolerance,
            exc: TargetRunError, progress: Progress | None, save: Path | None) -> BisectResult:
    """The target cannot run the model at all: find the node whose presence makes it fail."""
    from aligner.search.crash import locate_failure

    failed = Probe("uncaptured", len(other.output_names), status="failed", error=str(exc))
    site = None
    try:
        site = locate_failure(other, target, feeds, reference_runner(graph, reference), progress, save)
    except AlignerError as again:  # e.g. the reference fails on a piece: say so, keep the first answer
        log.warning("could not localise the failure: %s", again)
    explanation = f"The target failed, so nothing was judged: {exc}"
    if site is not None:
        explanation += " " + site.describe()
        if site.repro:
            explanation += f" The smallest failing prefix is saved as {site.repro}."
    return BisectResult(model=str(graph.path or "<in-memory>"), target=str(target), reference=str(reference), strategy=strategy,
                        strategy_used=strategy, nodes=len(graph.nodes), tolerance=tol, first_divergent=None, root_cause=None,
                        nonfinite_origin=None, local_errors=(), probes=(failed,), outputs_diverge=False, failed=str(exc),
                        explanation=explanation, failure_site=site)


def _resolve(strategy: str, target: Target, graph: ModelGraph, sizes: dict[str, int], budget: int) -> str:
    if strategy != "auto":
        return strategy
    total = sum(sizes.get(t, UNKNOWN_SIZE) for t in graph.activations())
    return "all" if backend_of(target).captures_cheaply and total <= budget else "frontier"


@dataclass(frozen=True)
class _Found:
    first: TensorDiff | None  # the first divergent tensor in topological order
    nonfinite_node: str | None  # the first node whose output has NaN/inf where the reference has none
    outputs_diverge: bool
    checked: str  # what the evidence covers, in words
    notes: tuple[str, ...] = ()


def _locate(run: BisectRun, strategy: str, budget: int, sweep_runs: int | None) -> _Found:
    """The first divergent tensor and NaN/inf origin, from every tensor (all, isolate) or from a
    frontier search plus a sweep of the tensors before what it found (frontier)."""
    names = run.graph.activations()
    if strategy in ("all", "isolate"):
        for _ in run.groups(plan_groups(names, estimate_sizes(run.graph, run.feeds), budget), "all"):
            pass
        checked = f"all {len(names)} tensors compared, in {len(run.probes)} run(s)"
        return _found(run, names, checked)
    n = len(run.order)
    lives = spans([(sorted(_node_inputs(run.graph.node(x))), list(run.graph.node(x).output)) for x in run.order], run.graph.output_names)
    known: dict[int, bool] = {}
    sizes = estimate_sizes(run.graph, run.feeds)
    position = {x: i for i, x in enumerate(run.order)}
    made_at = {t: position.get(run.graph.producer[t].name, -1) if t in run.graph.producer else -1 for t in names}

    def probe(cut: int) -> bool:
        crossing = frontier(lives, cut)
        if crossing and all(t in run.diffs for t in crossing):  # every tensor at this cut was compared already: no run
            return any(run.diffs[t].blamed for t in crossing)
        phase = "outputs" if cut == n else "frontier"
        ticket = run.pending.pop(("cut", cut), None)
        if ticket is not None:  # run ahead on a worker: the cut's tensors alone
            rows = run.capture(crossing, phase, cut, ticket=ticket)
            return any(r.blamed for r in rows)
        # The sweep's tensors ride along in the halving runs, as far as the budget allows: first those made before
        # the last cut known to match (the transition is at or after it), then those before the first known to diverge.
        lo = max(k for k, v in known.items() if not v)
        hi = min((k for k, v in known.items() if v), default=n + 1)
        room = budget - sum(sizes.get(t, UNKNOWN_SIZE) for t in crossing)
        taken, extra = set(crossing), []
        for t in sorted((t for t in names if t not in run.diffs and t not in taken and made_at[t] < hi),
                        key=lambda t: (made_at[t] >= lo, made_at[t])):
            size = sizes.get(t, UNKNOWN_SIZE)
            if size > room:
                break
            room -= size
            extra.append(t)
        rows = run.capture(crossing + extra, phase, cut, judged=taken)
        if extra and any(r.perturbed for r in rows if r.tensor in taken):  # the riders moved the target: the cut alone decides
            rows = run.capture(crossing, phase, cut)
        return any(r.blamed for r in rows if r.tensor in taken)

    def ahead(cuts: list[int]) -> None:  # the binary search's next levels, each cut a run on a worker
        wanted = {("cut", k) for k in cuts if k not in known and not all(t in run.diffs for t in frontier(lives, k) or ["-"])}
        run.drop(lambda key: key in wanted)
        for key in sorted(wanted, key=lambda key: cuts.index(key[1])):
            run.send(key, frontier(lives, key[1]))

    known.setdefault(0, False)
    width = run.executor.workers if run.executor is not None else 1
    j = bisect_cuts(n, probe, known, ahead=ahead if run.executor is not None else None, width=width)
    run.drop()
    halving = len(run.probes)
    transition = (f"the frontier search found a transition at {run.graph.node(run.order[j]).op_type} node {run.order[j]!r} "
                  f"(#{run.graph.index_of[run.order[j]]}) in {halving} halving run(s)" if j is not None else
                  f"the graph outputs match ({halving} run)")
    # A divergence that a later node masks leaves no trace at the cuts probed: every tensor produced before the
    # transition (every tensor, when the outputs match) is compared — most in the halving runs, the rest swept here.
    before = run.graph.index_of[run.order[j]] if j is not None else len(run.graph.nodes)
    wanted = [t for t in names if _produced_at(run.graph, t) < before]
    todo = [t for t in wanted if t not in run.diffs]
    groups = plan_groups(todo, sizes, budget)
    limit = len(groups) if sweep_runs is None else min(sweep_runs, len(groups))
    swept = 0
    for group, rows in run.groups(groups[:limit], "sweep"):
        swept += len(group)
        if any(r.blamed for r in rows):
            break
    scope = "before it" if j is not None else "of the graph"
    sweeps = len(run.probes) - halving
    checked = (f"{transition}; {len(wanted) - len(todo)} of the {len(wanted)} other tensors {scope} compared in those runs, "
               f"{swept} more in {sweeps} sweep run(s)")
    notes = []
    if swept < len(todo) and not any(run.diffs[t].blamed for t in todo if t in run.diffs):
        notes.append(f"the sweep for masked divergences stopped at --sweep-runs {sweep_runs}: {len(todo) - swept} tensor(s) "
                     f"{scope} were not compared; raise --sweep-runs or use --strategy all for a complete answer")
    found = _found(run, names, checked, notes)
    return replace(found, nonfinite_node=_nonfinite_by_frontier(run, lives, n, found.nonfinite_node))


def _found(run: BisectRun, names: list[str], checked: str, notes: list[str] = ()) -> _Found:
    rows = [run.diffs[t] for t in names if t in run.diffs]
    first = next((r for r in rows if r.blamed), None)
    nf = next((r.node for r in rows if r.new_nonfinite and r.blamed), None)
    outputs = [run.diffs[o] for o in run.graph.output_names if o in run.diffs]
    perturbed = [r.tensor for r in rows if r.perturbed]
    if perturbed:
        notes = [*notes, f"{len(perturbed)} tensor(s) were captured in runs that changed the target's outputs (capture perturbs a "
                         f"fusion): labelled, not blamed, e.g. {', '.join(perturbed[:3])}"]
    notes = [*notes, *run.observer.notes(sorted(run.observer.absorbed))]
    return _Found(first, nf, any(r.blamed for r in outputs), checked, tuple(notes))


def _produced_at(graph: ModelGraph, tensor: str) -> int:
    node = graph.producer.get(tensor)
    return graph.index_of[node.name] if node is not None else -1


def _nonfinite_by_frontier(run: BisectRun, lives, n: int, seen: str | None) -> str | None:
    """Where NaN/inf start: when a frontier probe saw new NaN/inf, bisect the cuts below it for
    the node that first writes them; the earlier of that and ``seen`` (a swept tensor)."""
    nf_cuts = {p.cut: bool(p.nonfinite) for p in run.probes if p.cut is not None and p.status == "ok"}
    if not any(nf_cuts.values()):
        return seen

    def has_nf(cut: int) -> bool:
        return any(r.new_nonfinite and r.blamed for r in run.capture(frontier(lives, cut), "frontier", cut))

    k = bisect_cuts(n, has_nf, nf_cuts, min(c for c, v in nf_cuts.items() if v))
    found = run.order[k] if k is not None else None
    candidates = [x for x in (found, seen) if x is not None]
    return min(candidates, key=run.graph.index_of.__getitem__) if candidates else None


def _neighbourhood(run: BisectRun, first: str | None, nf_node: str | None, window: int) -> list[str]:
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


def _origin(run: BisectRun, node: str | None, local: LocalError | None) -> NonfiniteOrigin | None:
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
