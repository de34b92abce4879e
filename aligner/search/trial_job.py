"""One precision trial as a job an executor's workers hold (:mod:`aligner.search.executor`).

:class:`TrialJob` runs the target with a pin set on every sample and applies the acceptance (the
output rule, then its external check: a task metric, a callable, a command). It is what each worker
loads once: the model crosses as its serialized bytes (a :class:`~aligner.graph.model.ModelGraph`
is rebuilt from them, with the same node names), with the target, samples, reference outputs and
acceptance. The serial search calls the same object in its own process, so a trial's verdict
does not depend on where it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from aligner.backends import make_runner
from aligner.backends.target import Target
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds
from aligner.search.acceptance import Acceptance, check_outputs, external_verdict


@dataclass(frozen=True)
class TrialResult:
    passed: bool
    metrics: dict[str, float]
    reason: str


class TrialJob:
    """``job(pins)`` -> :class:`TrialResult`; raises :class:`~aligner.errors.TargetRunError` when the
    target cannot build or run."""

    def __init__(self, graph: ModelGraph, target: Target, samples: Sequence[Feeds], reference: Sequence[dict], accept: Acceptance):
        self.graph, self.target, self.samples, self.reference, self.accept = graph, target, list(samples), list(reference), accept

    def __call__(self, pins: frozenset[str]) -> TrialResult:
        runner = make_runner(self.graph, self.target, pins)
        worst: dict[str, float] = {}
        reason = ""
        for feeds, ref in zip(self.samples, self.reference):
            said = check_outputs(self.accept, ref, runner.run(feeds), worst)  # every sample runs: worst covers them all
            reason = reason or said
        if not reason:
            reason = external_verdict(self.accept, lambda: trial_model(self.graph, self.target, pins), runner)
        return TrialResult(not reason, worst, reason)


def trial_model(graph: ModelGraph, target: Target, pins) -> onnx.ModelProto:
    """The model a trial runs: FP16/BF16 rewritten with ``pins`` in FP32, or INT8 quantized by ONNX
    Runtime's quantizer with ``pins`` excluded (kept in float)."""
    if target.is_quantized:
        from aligner.quant.quantize import quantize

        return quantize(graph, target, exclude=pins).model
    from aligner.graph.precision import rewrite_precision

    return rewrite_precision(graph, pins, target.precision).model


__all__ = ["TrialJob", "TrialResult", "trial_model"]
