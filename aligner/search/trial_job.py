"""One precision trial as a job an executor's workers hold (:mod:`aligner.search.executor`).

:class:`TrialJob` runs the target with a pin set on every sample and applies the acceptance (the
output rule, then its external check: a task metric, a callable, a command). It is what each worker
loads once: the model crosses as its serialized bytes (a :class:`~aligner.graph.model.ModelGraph`
is rebuilt from them, with the same node names), with the target, samples, reference outputs and
acceptance. The serial search calls the same object in its own process, so a trial's verdict
does not depend on where it ran.

A trial can also run as parts (:class:`Trials`): when the acceptance's task metric splits (it has
``pieces``, ``part(runner, shard)`` and ``merge(parts)``: :class:`aligner.eval.run.CocoTask`, COCO
AP over shards of the images) and the executor has several workers, each trial is sent as parts
over shards of its pieces, the first part also checking the outputs on the samples; the parts are
merged here, in shard order, into the verdict the whole trial gives. So a search with fewer
trials at a time than workers still keeps every worker busy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx

from aligner.backends import make_runner
from aligner.backends.target import Target
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds
from aligner.search.acceptance import Acceptance, check_outputs, external_verdict
from aligner.search.executor import Executor, Outcome


@dataclass(frozen=True)
class TrialResult:
    passed: bool
    metrics: dict[str, float]
    reason: str


@dataclass(frozen=True)
class TrialPart:
    """Part ``index`` of the trial of ``pins``: the task metric on its pieces ``shard``; part 0 also
    checks the outputs on the samples."""

    pins: frozenset[str]
    index: int
    shard: range


@dataclass(frozen=True)
class PartResult:
    worst: dict[str, float]  # part 0: the output rule's worst metrics (else empty)
    reason: str  # part 0: why the outputs fail the rule ('' when they pass)
    value: Any  # the task metric's part


class TrialJob:
    """``job(pins)`` -> :class:`TrialResult`, ``job(TrialPart)`` -> :class:`PartResult`; raises
    :class:`~aligner.errors.TargetRunError` when the target cannot build or run."""

    def __init__(self, graph: ModelGraph, target: Target, samples: Sequence[Feeds], reference: Sequence[dict], accept: Acceptance):
        self.graph, self.target, self.samples, self.reference, self.accept = graph, target, list(samples), list(reference), accept
        self._runners: dict[frozenset[str], Any] = {}  # the last trials' runners: a worker often gets several parts of one

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _runners={})  # sessions stay where they were made

    def __call__(self, task: frozenset[str] | TrialPart) -> TrialResult | PartResult:
        if isinstance(task, TrialPart):
            return self._part(task)
        runner = self._runner(task)
        worst, reason = self._outputs(runner)
        if not reason:
            reason = external_verdict(self.accept, lambda: trial_model(self.graph, self.target, task), runner)
        return TrialResult(not reason, worst, reason)

    def _part(self, part: TrialPart) -> PartResult:
        runner = self._runner(part.pins)
        worst, reason = self._outputs(runner) if part.index == 0 else ({}, "")
        return PartResult(worst, reason, None if reason else self.accept.task.part(runner, part.shard))

    def _runner(self, pins: frozenset[str]):
        if pins not in self._runners:
            if len(self._runners) >= 2:
                self._runners.pop(next(iter(self._runners)))
            self._runners[pins] = make_runner(self.graph, self.target, pins)
        return self._runners[pins]

    def _outputs(self, runner) -> tuple[dict[str, float], str]:
        worst: dict[str, float] = {}
        reason = ""
        for feeds, ref in zip(self.samples, self.reference):
            said = check_outputs(self.accept, ref, runner.run(feeds), worst)  # every sample runs: worst covers them all
            reason = reason or said
        return worst, reason

    def rest(self, pins: frozenset[str]) -> str:
        """The acceptance's checks after the task metric (a callable, a command), as the whole trial runs them."""
        rule = replace(self.accept, task=None)
        return external_verdict(rule, lambda: trial_model(self.graph, self.target, pins), None)


def splits(accept: Acceptance) -> int:
    """How many pieces the acceptance's task metric splits into (0: it does not split)."""
    task = accept.task
    if task is None or not all(callable(getattr(task, m, None)) for m in ("part", "merge")):
        return 0
    return int(getattr(task, "pieces", 0) or 0)


class Trials:
    """Sends trials to ``executor`` and gives back each one's :class:`~aligner.search.executor.Outcome`
    (a :class:`TrialResult`), whole or as parts (see the module's doc): ``submit(pins)`` -> a handle,
    ``result(handle)``, ``discard(handle)``. Parts are queued in order, so the trial asked for first
    gets the workers first and later trials fill the rest."""

    def __init__(self, executor: Executor, job: TrialJob):
        self.executor, self.job = executor, job
        pieces = splits(job.accept)
        self.parts = min(pieces, executor.workers) if executor.workers > 1 and pieces > 1 else 1
        self.shards = [range(pieces * i // self.parts, pieces * (i + 1) // self.parts) for i in range(self.parts)]

    def submit(self, pins: frozenset[str]) -> tuple[frozenset[str], list[int]]:
        if self.parts == 1:
            return pins, [self.executor.submit(pins)]
        return pins, [self.executor.submit(TrialPart(pins, i, shard)) for i, shard in enumerate(self.shards)]

    def discard(self, handle: tuple[frozenset[str], list[int]]) -> None:
        for ticket in handle[1]:
            self.executor.discard(ticket)

    def result(self, handle: tuple[frozenset[str], list[int]]) -> Outcome:
        pins, tickets = handle
        if self.parts == 1:
            return self.executor.result(tickets[0])
        outcomes: list[Outcome] = []
        for i, ticket in enumerate(tickets):
            outcome = self.executor.result(ticket)
            outcomes.append(outcome)
            if outcome.error is not None or (i == 0 and outcome.value.reason):  # decided: the other parts are not needed
                for rest in tickets[i + 1:]:
                    self.executor.discard(rest)
                break
        seconds, worker = sum(o.seconds for o in outcomes), outcomes[0].worker if len(outcomes) == 1 else f"{len(outcomes)} parts"
        error = next((o.error for o in outcomes if o.error is not None), None)
        if error is not None:
            return Outcome(None, error, worker, seconds)
        first = outcomes[0].value
        reason = first.reason or self.job.accept.task.merge([o.value.value for o in outcomes]) or self.job.rest(pins)
        return Outcome(TrialResult(not reason, first.worst, reason), None, worker, seconds)


def trial_model(graph: ModelGraph, target: Target, pins) -> onnx.ModelProto:
    """The model a trial runs: FP16/BF16 rewritten with ``pins`` in FP32, or INT8 quantized by ONNX
    Runtime's quantizer with ``pins`` excluded (kept in float)."""
    if target.is_quantized:
        from aligner.quant.quantize import quantize

        return quantize(graph, target, exclude=pins).model
    from aligner.graph.precision import rewrite_precision

    return rewrite_precision(graph, pins, target.precision).model


__all__ = ["PartResult", "TrialJob", "TrialPart", "TrialResult", "Trials", "splits", "trial_model"]
