"""``tune``: the runtime options a build ships with, measured side by side on the built model.

A lower precision is only worth shipping when it is faster, and on ONNX Runtime CUDA that often
depends on a provider option more than on the precision (DETR-R50 FP16 on the H200: 20.8 ms with
the default cuDNN algorithm search, 8.3 ms with ``cudnn_conv_algo_search=HEURISTIC``). The
candidates, per runtime (:func:`candidates`; one change from the runtime's defaults at a time, then
the best combination — a small grid, not a full product):

``ort:cuda:*``
    ``cudnn_conv_algo_search=HEURISTIC`` and ``=DEFAULT`` (ONNX Runtime's default: EXHAUSTIVE);
    ``prefer_nhwc=1``; ``cudnn_conv_use_max_workspace=0`` (default 1); ``use_tf32=1`` on fp16/bf16
    targets, for their FP32 parts (pinned and automatically kept nodes); ``enable_cuda_graph=1``
    when every model input has a static shape (rejected where ONNX Runtime cannot capture the
    graph: a node on the CPU, control flow, or a run without I/O binding).
``ort:cpu:*``
    ``intra_op_num_threads=1`` and ``=<logical cores>`` (default: physical cores);
    ``graph_optimization_level=extended`` and ``=basic`` (default ``all``).

Options the target already sets (``@key=value``) are fixed: no candidate changes them.

How each candidate is judged: its session is built and run once on the inputs (the first run
also does cuDNN's algorithm search); a candidate whose session fails or whose run raises is
rejected as ``error`` with ONNX Runtime's message (FP16 with ``prefer_nhwc=1``: cuDNN finds "No
execution plans"); one whose outputs diverge from the FP32 reference (the original model on
``ort:cpu:fp32``) under the one verdict rule (:class:`~aligner.compare.tolerance.Tolerance`: the
build's, else the target's default, :func:`~aligner.compare.tolerance.tolerance_for`; each output
by its own override, judged as compare judges it) is rejected as ``inaccurate``. The rest are timed in ``rounds`` interleaved rounds (the order
rotated every round) of ``runs`` runs after ``warmup`` untimed ones, as ``bench`` times (CUDA:
I/O bound on the GPU, synchronised); a candidate's latency is the median of all its runs, its
spread the range of its per-round medians. Candidates within the **noise band** (``noise``,
default 3 %) of the fastest are ties, and among ties the one that changes the fewest options
wins (the defaults first). When single changes of two or more options each beat the defaults by
more than the noise band, their best values are combined and timed again, interleaved with the
defaults and the best single change; the choice is made among those three.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from aligner.backends import backend_of, backends, check_target, make_runner, reference_runner
from aligner.backends.target import Target
from aligner.compare.layerwise import diff_tensor
from aligner.compare.tolerance import Tolerance, tolerance_for
from aligner.errors import AlignerError, InputError
from aligner.graph.model import ModelGraph

NOISE = 0.03  # candidates within 3 % of the fastest median are ties (prefer the fewest changes)
Options = tuple[tuple[str, str], ...]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TuneSettings:
    """How hard the tuner measures: ``rounds`` interleaved rounds of ``runs`` timed runs after
    ``warmup`` untimed ones per candidate, ties within ``noise`` (a fraction of the fastest)."""

    rounds: int = 5
    runs: int = 20
    warmup: int = 5
    noise: float = NOISE

    def __post_init__(self):
        if self.rounds < 1 or self.runs < 1 or self.warmup < 0 or not 0 <= self.noise < 1:
            raise InputError(f"Tuning needs rounds >= 1, runs >= 1, warmup >= 0 and 0 <= noise < 1 (got {self}).")


@dataclass(frozen=True)
class TuneCandidate:
    """One set of options tried: the changes from the defaults, and how it fared."""

    options: Options  # the options this candidate changes (on top of the fixed ones); () = the defaults
    status: Literal["ok", "error", "inaccurate"]
    reason: str = ""  # why it was rejected, or how close its outputs came
    median_ms: float | None = None
    spread_ms: float | None = None  # max - min of the per-round medians
    rounds_ms: tuple[float, ...] = ()  # the per-round medians
    worst_rel_l2: float | None = None  # outputs against the FP32 reference
    phase: int = 1  # 1: the single changes; 2: re-timed with the combination

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.options) or "defaults"

    def to_dict(self) -> dict:
        return {"options": dict(self.options), "label": self.label, "status": self.status, "reason": self.reason,
                "median_ms": self.median_ms, "spread_ms": self.spread_ms, "rounds_ms": list(self.rounds_ms),
                "worst_rel_l2": self.worst_rel_l2, "phase": self.phase}


@dataclass(frozen=True)
class TuneResult:
    """The tuned target (fixed options plus the chosen ones), every candidate, and why."""

    target: Target
    fixed: Options  # options the target set before tuning (never changed)
    chosen: Options | None  # the winner's changes; None when no candidate passed
    candidates: tuple[TuneCandidate, ...]
    tolerance: Tolerance
    settings: TuneSettings
    input_shapes: Mapping[str, tuple[int, ...]]
    decision: str

    def to_dict(self) -> dict:
        return {"target": str(self.target), "fixed": dict(self.fixed), "chosen": None if self.chosen is None else dict(self.chosen),
                "decision": self.decision, "tolerance": self.tolerance.to_dict(), "noise": self.settings.noise,
                "rounds": self.settings.rounds, "runs": self.settings.runs, "warmup": self.settings.warmup,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "candidates": [c.to_dict() for c in self.candidates]}


def candidates(target: Target, graph: ModelGraph) -> list[dict[str, str]]:
    """The documented candidate set of ``target`` (module docstring; its runtime's ``tune`` hook): the
    defaults first, then one change at a time; changes to an option the target fixes are left out."""
    runtime = backend_of(target)
    if runtime.tune is None:
        raise InputError(f"Target {target}: {runtime.title} targets are not tuned here ({runtime.not_tuned}).")
    return runtime.tune(target, graph)


def check_tunable(target: Target) -> Target:
    """``target`` checked for tuning before any work: ONNX Runtime, and its provider in this install."""
    target = check_target(target)
    runtime = backend_of(target)
    if runtime.tune is None:
        tuned = ", ".join(f"{name}:*" for name, b in backends().items() if b.tune is not None)
        raise InputError(f"Target {target}: --tune times runtime options ({tuned} targets); {runtime.not_tuned}.")
    if runtime.tune_check is not None:
        runtime.tune_check(target)  # a missing provider is named here, not after the build
    return target


def tune(model: ModelGraph, target: str | Target, *, reference: ModelGraph | None = None,
         feeds: Mapping[str, np.ndarray] | None = None, options: Sequence[Mapping[str, str]] | None = None,
         tolerance: Tolerance | None = None, settings: TuneSettings = TuneSettings(),
         expected: Mapping[str, np.ndarray] | None = None, progress: Progress | None = None) -> TuneResult:
    """Time ``options`` (default: :func:`candidates`) for ``model`` — the model as it ships, e.g. the
    precision-rewritten build — on ``target`` and keep the fastest that passes (module docstring).

    ``reference`` is the FP32 model the outputs are checked against on ``ort:cpu:fp32`` (default:
    ``model`` itself); ``feeds`` the inputs (default: generated); ``tolerance`` defaults to the
    target's (:func:`tolerance_for`); ``expected`` the reference's outputs on ``feeds`` when they are
    already known (several precisions tuned against one reference). ``progress`` receives one line per step."""
    target = check_tunable(Target.parse(target))
    say = progress or (lambda _line: None)
    feeds = dict(feeds) if feeds is not None else _generated(model)
    tolerance = tolerance or tolerance_for(target)
    options = [dict(o) for o in (candidates(target, model) if options is None else options)]
    if expected is None:
        say(f"reference outputs on ort:cpu:fp32 ({len(options)} candidate(s) for {target})")
        expected = reference_runner(reference or model).run(feeds)
    trials = []
    for i, change in enumerate(options, 1):
        trial = _Trial.start(model, target, change, feeds, expected, tolerance)
        say(f"candidate {i}/{len(options)} {trial.record.label}: " + (trial.record.reason if trial.record.status != "ok" else "outputs within tolerance"))
        trials.append(trial)
    _time(trials, settings, say, phase=1)
    final = _combination(trials, model, target, feeds, expected, tolerance, settings, say)
    records = [t.record for t in trials]
    chosen, decision = _choose(records, final, settings.noise)
    tuned = target.with_options(dict(chosen.options)) if chosen else target
    say(f"chosen: {decision}")
    return TuneResult(tuned, target.options, chosen.options if chosen else None, tuple(records), tolerance, settings,
                      {k: tuple(np.shape(v)) for k, v in feeds.items()}, decision)


class _Trial:
    """One candidate's runner and measurements while tuning."""

    def __init__(self, record: TuneCandidate, runner=None, feeds=None):
        self.record, self.runner, self.feeds = record, runner, feeds
        self.times: list[float] = []
        self.round_medians: list[float] = []

    @classmethod
    def start(cls, model: ModelGraph, target: Target, change: Mapping[str, str], feeds, expected, tolerance: Tolerance) -> "_Trial":
        """Build the candidate's runner and run it once: rejected as ``error`` or ``inaccurate``, or ready to time."""
        options = tuple(sorted((str(k), str(v)) for k, v in change.items()))
        try:  # the first run in ONNX Runtime's sandbox (a crash is this candidate's error), the timing in-process as bench's
            runner = make_runner(model, target.with_options(dict(options)))
            outputs = runner.run(feeds)
        except AlignerError as exc:
            return cls(TuneCandidate(options, "error", str(exc)))
        worst, diverging = 0.0, []
        for name, ref in expected.items():
            got = outputs.get(name)
            if got is None:
                diverging.append(f"{name}: missing")
                continue
            rule = tolerance.for_output(name)
            diff = diff_tensor(_float(ref), _float(got), rule)
            worst = max(worst, float(diff.metrics.get("rel_l2", 0.0)))
            if diff.diverges:
                detail = f"{rule.metric} {diff.metrics.get(rule.metric, float('nan')):.3g}" if diff.reason == "metric" else diff.reason
                diverging.append(f"{name}: {detail}")
        if diverging:
            reason = f"outputs diverge from FP32 beyond {tolerance.describe()}: " + "; ".join(diverging)
            return cls(TuneCandidate(options, "inaccurate", reason, worst_rel_l2=worst))
        return cls(TuneCandidate(options, "ok", f"outputs rel_l2 <= {worst:.3g}", worst_rel_l2=worst), runner, feeds)

    def time_round(self, runs: int, warmup: int) -> None:
        try:
            times = self.runner.time(self.feeds, runs, warmup)
        except AlignerError as exc:
            self.record, self.runner = replace(self.record, status="error", reason=f"failed while timing: {exc}"), None
            return
        self.times.extend(times)
        self.round_medians.append(statistics.median(times))

    def finish(self, phase: int) -> None:
        if self.record.status != "ok" or not self.times:
            return
        medians = tuple(self.round_medians)
        self.record = replace(self.record, median_ms=statistics.median(self.times), spread_ms=max(medians) - min(medians),
                              rounds_ms=medians, phase=phase)


def _time(trials: list[_Trial], settings: TuneSettings, say: Progress, phase: int) -> None:
    """Interleaved rounds over the candidates still standing, the order rotated each round."""
    for trial in trials:
        trial.times, trial.round_medians = [], []
    for r in range(settings.rounds):
        live = [t for t in trials if t.runner is not None]
        if not live:
            return
        say(f"timing round {r + 1}/{settings.rounds} ({len(live)} candidate(s))")
        shift = r % len(live)
        for trial in live[shift:] + live[:shift]:
            trial.time_round(settings.runs, settings.warmup if r == 0 else 1)
    for trial in trials:
        trial.finish(phase)


def _combination(trials: list[_Trial], model, target, feeds, expected, tolerance, settings, say) -> list[TuneCandidate] | None:
    """The best value of each option whose single change beat the defaults beyond the noise band,
    combined and re-timed with the defaults and the best single change; None when fewer than two
    options qualify (the choice is then made among every candidate)."""
    ok = [t for t in trials if t.record.status == "ok"]
    default = next((t for t in ok if not t.record.options), None)
    bar = default.record.median_ms / (1 + settings.noise) if default else float("inf")
    best: dict[str, _Trial] = {}
    for t in ok:
        if len(t.record.options) == 1 and t.record.median_ms < bar:
            key = t.record.options[0][0]
            if key not in best or t.record.median_ms < best[key].record.median_ms:
                best[key] = t
    if len(best) < 2:
        return None
    combined = {k: v for t in best.values() for k, v in t.record.options}
    combo = _Trial.start(model, target, combined, feeds, expected, tolerance)
    say(f"combination {combo.record.label}: " + (combo.record.reason if combo.record.status != "ok" else "outputs within tolerance"))
    trials.append(combo)
    if combo.record.status != "ok":
        return None
    single = min(best.values(), key=lambda t: t.record.median_ms)
    again = [t for t in (default, single, combo) if t is not None]
    _time(again, settings, say, phase=2)
    return [t.record for t in again if t.record.status == "ok"]


def _choose(records: list[TuneCandidate], pool: list[TuneCandidate] | None, noise: float) -> tuple[TuneCandidate | None, str]:
    """The fastest passing candidate, ties within the noise band going to the fewest changes."""
    ok = [c for c in (records if pool is None else pool) if c.status == "ok" and c.median_ms is not None]
    if not ok:
        reasons = "; ".join(f"{c.label}: {c.status}" for c in records)
        return None, f"no candidate passed ({reasons}); the target keeps its own options"
    fastest = min(ok, key=lambda c: c.median_ms)
    ties = [c for c in ok if c.median_ms <= fastest.median_ms * (1 + noise)]
    chosen = min(ties, key=lambda c: (len(c.options), c.median_ms))
    default = next((c for c in ok if not c.options), None)
    if chosen is default:
        beyond = "" if fastest is default else f" ({fastest.label} {fastest.median_ms:.3f} ms is within the {noise:.0%} noise band)"
        return chosen, f"defaults kept: {chosen.median_ms:.3f} ms{beyond}"
    if default is None:
        rejected = next((c for c in records if not c.options), None)
        why = f"the defaults were rejected ({rejected.status})" if rejected else "the defaults were not a candidate"
        return chosen, f"{chosen.label}: {chosen.median_ms:.3f} ms; {why}"
    return chosen, (f"{chosen.label}: {chosen.median_ms:.3f} ms vs the defaults' {default.median_ms:.3f} ms "
                    f"({default.median_ms / chosen.median_ms:.2f}x)")


def _float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


def _generated(model: ModelGraph) -> dict:
    from aligner.inputs import make_inputs

    return make_inputs(model)


__all__ = ["NOISE", "TuneCandidate", "TuneResult", "TuneSettings", "candidates", "check_tunable", "tune"]
