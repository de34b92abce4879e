"""``search_precision``: the smallest verified set of FP32 nodes that makes a low-precision target pass.

One reference pass gives the value range of every tensor; nodes that read or write values beyond
the low type's range (or divide by values it flushes to zero) are the seeds. Trials run the target
with a pin set and apply the acceptance check on every input sample; the search itself is
:func:`aligner.search.pins.search_pins`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from aligner.backends import parse_target, reference_runner
from aligner.backends.replay import model_sha, verification
from aligner.backends.target import Target
from aligner.compare.layerwise import check_budget, compare
from aligner.compare.tolerance import tolerance_for
from aligner.errors import InputError, TargetRunError
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.graph.precision import auto_pinned, is_fp32, node_typing
from aligner.inputs import Feeds, make_inputs, validate_feeds, write_atomic
from aligner.search.acceptance import Acceptance, default_acceptance
from aligner.search.executor import Executor, SerialExecutor, Workers
from aligner.search.workers import make_executor
from aligner.search.pins import Trial, search_pins
from aligner.search.seeds import seed_pins, value_ranges  # noqa: F401 - value_ranges: the search's public helper too
from aligner.search.plan import Pin, PrecisionPlan, TrialLog, flop_fraction
from aligner.search.trial_job import TrialJob, Trials, trial_model
from aligner.limits import LOW_MAX

log = logging.getLogger(__name__)


# ---- trials --------------------------------------------------------------------------------------

class _Evaluator:
    """check(pins, phase) -> Trial, memoised through the trials log."""

    def __init__(self, graph: ModelGraph, target: Target, samples: list[Feeds], accept: Acceptance, log_: TrialLog,
                 locate: bool, max_trials: int, progress: Callable[[Trial, int], None] | None, universe: Sequence[str] = (),
                 fallback=None, executor: Executor | None = None, reference: Sequence[dict] | None = None):
        executor = executor or SerialExecutor()
        self.graph, self.target, self.samples, self.accept, self.log = graph, target, samples, accept, log_
        self.fallback = fallback  # INT8: aligner.search.int8.FallbackRanking; the search is int8.search_fallback
        self.locate, self.max_trials, self.progress, self.universe = locate, max_trials, progress, set(universe)
        if reference is None:
            ref = reference_runner(graph)
            reference = [ref.run(feeds) for feeds in samples]
        self.reference = list(reference)
        job = TrialJob(graph, target, samples, self.reference, accept)
        if target.is_quantized:  # started with the INT8 job already (aligner.search.int8.quantizer_settings): trials are its tasks
            from aligner.search.int8 import QuantizedTrialJob

            executor = QuantizedTrialJob.trials_on(executor, target)
        else:
            executor.start(job)  # each worker loads it once
        self.executor = executor
        self.runs = Trials(executor, job)  # a trial whole, or as parts over its task metric's images
        self.pending: dict[frozenset[str], tuple] = {}  # trials running ahead: pin set -> its handle
        self.trials = log_.resumed  # numbered on from a resumed log, so the count agrees with the log
        self.new_trials = 0  # run by this call (what --max-trials limits)
        self.culprit_runs = 0
        self.best: Trial | None = None  # the passing trial with the fewest pins so far

    def __call__(self, pins: frozenset[str], phase: str) -> Trial:
        trial = self.log.cache.get(pins) or self._new(pins, phase)
        if trial.passed and (self.best is None or len(trial.pins) <= len(self.best.pins)):
            self.best = trial
        return trial

    def ahead(self, upcoming: Iterator[frozenset[str]]) -> None:
        """Run ahead the trials the search will check next if the coming ones fail (``upcoming``, in
        the search's order): the first not yet known, as many as the executor runs at once (and the
        trial cap allows). Trials no longer upcoming are dropped. Results are logged only when the
        search asks for them, so the log is the serial search's."""
        room = min(self.executor.workers, self.max_trials - self.new_trials)
        wanted: list[frozenset[str]] = []
        for pins in upcoming:
            if len(wanted) >= room:
                break
            if pins not in self.log.cache and pins not in wanted:
                wanted.append(pins)
        for pins in [p for p in self.pending if p not in wanted]:
            self.runs.discard(self.pending.pop(pins))
        for pins in wanted:
            if pins not in self.pending:
                self.pending[pins] = self.runs.submit(pins)

    def _new(self, pins: frozenset[str], phase: str) -> Trial:
        if self.new_trials >= self.max_trials:
            raise _OutOfTrials()
        handle = self.pending.pop(pins, None)
        outcome = self.runs.result(handle if handle is not None else self.runs.submit(pins))
        passed, metrics, reason, error = False, {}, "", ""
        if isinstance(outcome.error, TargetRunError):
            error = str(outcome.error)
        elif outcome.error is not None:
            raise outcome.error
        else:
            passed, metrics, reason = outcome.value.passed, outcome.value.metrics, outcome.value.reason
        start = time.perf_counter()
        culprit = None
        if not passed and not error and (phase in ("seed", "grow") or (phase == "pure" and self.locate)):
            culprit = self._culprit(pins)  # only growing needs to know where it goes wrong
        seconds = outcome.seconds + time.perf_counter() - start
        trial = Trial(pins, passed, phase, metrics, culprit, error, seconds, reason, worker=outcome.worker)
        self.trials += 1
        self.new_trials += 1
        self.log.record(trial)
        if self.progress:
            self.progress(trial, self.trials)
        return trial

    def _culprit(self, pins: frozenset[str]) -> str | None:
        """Where NaN/inf (else the divergence) starts under these pins, not already pinned; on INT8,
        the first unpinned node of the ranked groups (no bisect per trial, and a failing task metric
        need not show as a divergent tensor)."""
        if self.fallback is not None:
            return next((n for g in self.fallback.groups for n in sorted(g.nodes) if n not in pins), None)
        from aligner.search.bisect import bisect

        verdict = bisect(self.graph, target=self.target.with_pins(pins), feeds=self.samples[0], strategy="auto", window=0)
        self.culprit_runs += verdict.target_runs
        for node in (verdict.nonfinite_origin.node if verdict.nonfinite_origin else None,
                     verdict.first_divergent.node if verdict.first_divergent else None):
            found = node if node in self.universe and node not in pins else self._unpinned_ancestor(node, pins) if node else None
            if found:
                return found
        return None

    def _unpinned_ancestor(self, name: str, pins: frozenset[str]) -> str | None:
        """The nearest unpinned ancestor of a node that goes wrong although pinned: it amplifies error its
        inputs carry (rounded upstream), so pinning the nodes that feed it is the way on."""
        level, seen = [name], {name}
        while level:
            parents = []
            for node in level:
                for tensor in _node_inputs(self.graph.node(node)):
                    src = self.graph.producer.get(tensor)
                    if src is not None and src.name not in seen and src.op_type != "Constant":
                        seen.add(src.name)
                        parents.append(src.name)
            found = [p for p in parents if p in self.universe and p not in pins]
            if found:
                return max(found, key=self.graph.index_of.__getitem__)
            level = parents
        return None


class _OutOfTrials(Exception):
    pass


def search_precision(
    model: ModelGraph | str | Path,
    target: str | Target = "emu:fp16",
    samples: Sequence[Feeds] | None = None,
    accept: Acceptance | None = None,
    trials_log: str | Path | None = None,
    resume: str | Path | None = None,
    max_trials: int = 200,
    save_model: str | Path | None = None,
    progress: Callable[[Trial, int], None] | None = None,
    sweep: bool = False,
    fusion_check: bool = True,
    workers: Workers | Executor = 1,
    capture_budget_mb: float = 512,
) -> PrecisionPlan:
    """The smallest verified set of nodes to keep in FP32 so ``target`` passes ``accept`` — the one
    verdict rule, :class:`~aligner.compare.tolerance.Tolerance` (default: the target's, as compare
    judges it: :func:`~aligner.compare.tolerance.tolerance_for`), its external check on top; on INT8
    targets the pins are nodes kept in float (excluded from quantization), every trial re-quantized
    with ONNX Runtime's quantizer and run on ``target``; ``sweep`` first picks the quantizer setting
    with the smallest full-INT8 error (:func:`aligner.quant.sweep.sweep_settings`).

    ``workers`` runs independent trials at once (:mod:`aligner.search.executor`): a number of local
    processes, ``"ray"`` or ``"ray://HOST:PORT"``, or an executor the caller made (and reads the
    stats of); the plan and the trials log are the serial search's (INT8 too: its settings sweep and
    trials run on the workers, which get the calibration's ranges, not its data).

    ``capture_budget_mb`` bounds the tensors held at once, as compare's does (half per side where two
    runs are compared): the value ranges, INT8's isolation, its ranking's batches of samples (one
    sample's activations at least: the unit), and the check of what diverges inside a plan."""
    check_budget(capture_budget_mb)
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    target = parse_target(target) if isinstance(target, str) else target
    from aligner.graph.precision import built_precision

    if built_precision(graph.model):  # its precision is fixed in the graph: pins would change nothing
        raise InputError(f"{graph.path or 'this model'} is an aligner build already rewritten to {built_precision(graph.model)} "
                         "(its precision is in the graph, so pins cannot change it). Search on the original FP32 model: "
                         "aligner precision original.onnx --target ...")
    if target.precision not in LOW_MAX and not target.is_quantized:
        raise InputError(f"aligner precision searches FP16/BF16 and INT8 builds; target {target} is {target.precision}. "
                         f"Use e.g. --target emu:fp16, ort:cuda:fp16 or ort:cpu:int8.")
    samples = [validate_feeds(graph, s) for s in samples] if samples else [make_inputs(graph)]
    accept = accept or tolerance_for(target)
    accept.check_names(graph.output_names)
    quantization: dict = {}
    auto: dict[str, str] = {}
    reference = None
    if not target.is_quantized:
        typing = {n.name: node_typing(n, graph.opset, target.precision) for n in graph.nodes}
        auto = auto_pinned(graph, typing)
        universe = pinnable(graph, auto)
    own = isinstance(workers, (int, str))
    executor = executor_for(workers, target) if own else workers
    executor.warm()  # workers import ONNX Runtime while the value ranges (INT8: the calibration) are measured
    try:
        if target.is_quantized:  # pins are nodes kept in float: candidates and seeds from aligner.search.int8
            from aligner.search import int8

            ref = reference_runner(graph)
            reference = [ref.run(feeds) for feeds in samples]
            target, quantization = int8.quantizer_settings(graph, target, samples, accept, sweep, executor, reference)
            universe = int8.quantizable(graph, target)
        header = {"model": str(graph.path or "<in-memory>"), "model_sha": model_sha(graph), "target": str(target),
                  "accept": list(accept.clauses()), "samples": len(samples)}
        with TrialLog(Path(trials_log) if trials_log else None, header, Path(resume) if resume else None) as log_:
            fallback = None
            if target.is_quantized:  # groups of nodes to keep in float together, by the tensor each keeps unquantized
                seeds, kernel = int8.quantization_seeds(graph, target, samples[0], universe, capture_budget_mb)
                fallback = int8.FallbackRanking(graph, target, samples, universe, kernel, capture_budget_mb=capture_budget_mb,
                                                executor=executor)
                evaluator = _Evaluator(graph, target, list(samples), accept, log_, not seeds, max_trials, progress, universe, fallback, executor,
                                       reference)
            else:  # pure low precision needs no seeds: on workers, its trial runs while the value ranges are measured
                evaluator = _Evaluator(graph, target, list(samples), accept, log_, False, max_trials, progress, universe, None, executor,
                                       reference)
                evaluator.ahead(iter([frozenset()]))
                seeds = seed_pins(graph, value_ranges(graph, samples, int(capture_budget_mb * 2**20) // 2), target.precision)
                evaluator.locate = not seeds
            pins, verified, notes = _search(list(seeds), evaluator, universe, max_trials, target.precision)
            passed = verified is not None and verified.passed and not notes  # a note says why the search has no verified plan
    finally:
        if own:
            executor.close()
    if log_.resumed:
        notes.append(f"resumed {log_.resumed} trial(s) from {resume}; {evaluator.new_trials} new")
    pins = sorted(pins, key=graph.index_of.__getitem__)
    if fallback is not None:  # besides the trials: the ranking's emulated runs (no quantizer call)
        quantization = {**quantization, "tensor_groups": len(fallback.groups), "emulated_runs": fallback.runs,
                        "ranking_samples": fallback.samples_read}
    reasons = _reasons(graph, pins, int8.fallback_reasons(pins, fallback.groups, seeds) if fallback else seeds, log_)
    plan = PrecisionPlan(
        model=str(graph.path or "<in-memory>"), precision=target.precision, target=str(target), accept=accept.clauses(),
        pins=tuple(Pin(n, graph.node(n).op_type, reasons[n]) for n in pins), passed=passed,
        trials=evaluator.trials, culprit_runs=evaluator.culprit_runs,
        final_metrics=dict(verified.metrics) if verified else {},
        fp16_flop_fraction=flop_fraction(graph, pins, {k: v.shape for k, v in samples[0].items()}),
        auto_pinned=auto, seeds=tuple(seeds), notes=tuple(notes), quantization=quantization,
        verified=verification(graph, samples),  # what a +plan.json replays, or refuses (aligner.backends.replay)
    )
    if fusion_check and plan.passed and not target.is_quantized:  # does the plan rely on a fusion? (aligner.search.fusion)
        from aligner.search.fusion import plan_fusion_dependence

        plan = replace(plan, fusion_dependence=plan_fusion_dependence(graph, target, pins, samples, accept, search_precision))
    if plan.passed and not target.is_quantized:
        plan = replace(plan, inside=hidden_divergence(graph, target, pins, samples[0], accept, capture_budget_mb))
    if save_model is not None and plan.passed:
        write_atomic(Path(save_model), trial_model(graph, target, pins).SerializeToString())
    return plan


def hidden_divergence(graph: ModelGraph, target: Target, pins: Sequence[str], feeds: Feeds, rule: Acceptance,
                      capture_budget_mb: float = 512) -> str:
    """'' when, with ``pins`` in FP32, every tensor matches as the outputs do; else what still diverges
    inside. The acceptance judges the outputs, so an inf that a later node masks (PP-OCR det's
    BatchNormalization on inputs that make its map ~0) passes it while compare of the plan exits 1."""
    with_plan = compare(graph, target=replace(target, pins=tuple(pins), plan=None), feeds=feeds, tolerance=rule,
                        capture_budget_mb=capture_budget_mb)
    first, nonfinite = with_plan.first_divergent, with_plan.first_nonfinite
    if first is None:
        return ""
    where = (f"NaN/inf at {nonfinite.op_type} {nonfinite.node!r}" if nonfinite is not None else f"first at {first.op_type} {first.node!r}")
    return (f"with the plan, {len(with_plan.diverging)} tensor(s) inside still diverge ({where}), masked before the outputs on "
            "these inputs; on other inputs they may not be: search on representative samples (--inputs-dir)")


def executor_for(workers: Workers, target: Target) -> Executor:
    """The executor a search on ``target`` runs its trials on (:func:`~aligner.search.workers.make_executor`):
    a Ray worker takes a GPU where the target runs on one."""
    return make_executor(workers, gpus=1.0 if target.device == "cuda" else 0.0)


def pinnable(graph: ModelGraph, auto: dict[str, str]) -> list[str]:
    """Nodes a pin changes, in topological order: compute nodes that touch an FP32 tensor (their
    bodies' outer reads included) and are not kept FP32 anyway."""
    return [n.name for n in graph.nodes if n.op_type != "Constant" and n.name not in auto
            and any(is_fp32(graph, x) for x in _node_inputs(n) | set(n.output))]


def _search(seeds: list[str], evaluator: _Evaluator, universe: list[str], max_trials: int,
            precision: str) -> tuple[list[str], Trial | None, list[str]]:
    """search_pins, and what to tell the user when it stops short: (pins, verifying trial or None,
    notes). A note means no verified plan: the first says why, and :func:`verdict` heads with it."""
    low = "INT8" if evaluator.fallback is not None else precision.upper()
    try:
        if evaluator.fallback is not None:  # INT8: the shortest passing prefix of the ranked tensor groups, then 1-minimal
            from aligner.search.int8 import search_fallback

            pins, verified = search_fallback(evaluator.fallback.groups, evaluator, evaluator.graph.index_of.__getitem__, evaluator.ahead)
        else:
            pins, verified = search_pins(seeds, evaluator, universe=universe, ahead=evaluator.ahead)
    except _OutOfTrials:
        best = evaluator.best
        cap = f"{CAPPED} {max_trials}-trial cap (--max-trials)"
        if best is None:
            return seeds, None, [f"{cap} before any trial passed; resume with --resume LOG (and a larger --max-trials) to go on"]
        everything = _everything(best.pins, universe, low)
        cache = evaluator.log.cache
        shown = sum(1 for p in best.pins if (t := cache.get(best.pins - {p})) is not None and not t.passed and not t.error)
        return sorted(best.pins), best, [f"{cap} while minimising: the best passing trial keeps {len(best.pins)} node(s) "
                                         + ("in FP32" if low != "INT8" else "in float") + (f" ({everything})" if everything else "")
                                         + f", {shown} of them shown necessary (removed alone, the check fails); resume with "
                                         "--resume LOG to finish"]
    last = evaluator.log.cache.get(frozenset(pins))
    if verified is None and last is not None and not last.error and set(universe) <= set(pins):
        return [], None, [f"No plan exists for this acceptance: even with all {len(universe)} node(s) kept in FP32 the check "
                          f"fails ({last.reason or 'not accepted'}). Loosen --accept, or check the acceptance command."]
    everything = _everything(pins, universe, low) if verified is not None else ""
    if everything:
        return pins, verified, [f"No {low} plan: the rule passes only with {everything}. Check the rule "
                                "(--metric/--threshold/--atol, --accept) against what compare reports for this target."]
    return pins, verified, []


CAPPED = "stopped at the"  # how the note of a search cut short by --max-trials begins (:func:`verdict`)


def _everything(pins, universe: Sequence[str], low: str) -> str:
    """'' unless ``pins`` keep every node a pin can change out of ``low`` precision; then says so."""
    if not universe or not set(universe) <= set(pins):
        return ""
    return f"every one of the {len(universe)} node(s) kept out of {low}: nothing runs in {low}"


def verdict(plan: PrecisionPlan) -> tuple[str, str]:
    """(head, why) of a plan's verdict line: PASSED, NOT VERIFIED (cut short by --max-trials) or
    NO PASSING PLAN, with the note that says why."""
    if plan.passed:
        return "PASSED", ""
    why = plan.notes[0] if plan.notes else "no trial passed"
    return ("NOT VERIFIED:" if why.startswith(CAPPED) else "NO PASSING PLAN:"), why


def _reasons(graph: ModelGraph, pins: list[str], seeds: dict[str, str], log_: TrialLog) -> dict[str, str]:
    out = {}
    pinned = set(pins)
    spread = any(t.phase == "all" for t in log_.cache.values())
    grown = "kept from the all-FP32 model as minimisation removed the rest (no single culprit)" if spread else "grown by the search"
    for name in pins:
        why = seeds.get(name) or next((f"NaN/inf or the divergence started here in a trial with {len(t.pins)} pin(s)"
                                       for t in log_.cache.values() if t.culprit == name), grown)
        without = log_.cache.get(frozenset(pinned - {name}))
        if without is not None and not without.passed:
            why += f"; necessary: without it the check fails ({without.reason or without.error or 'not accepted'})"
        out[name] = why
    return out


__all__ = ["Acceptance", "default_acceptance", "executor_for", "hidden_divergence", "search_precision", "seed_pins", "value_ranges", "verdict"]
