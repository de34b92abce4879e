"""A short sweep of ONNX Runtime quantizer settings: the one with the smallest full-INT8 error.

The best calibration method and ``reduce_range`` differ per model (and ``reduce_range`` helps CPUs
without VNNI, whose 16-bit accumulation saturates), so before pins are searched every candidate
setting quantizes the whole model and runs it on the target's real kernels; the setting whose
worst output error over the samples is smallest wins. Calibration runs once per method (its
ranges are cached), so the sweep costs one calibration per method and one quantize+run per setting.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from aligner.backends.target import Target
from aligner.compare.metrics import HIGHER_IS_BETTER, all_metrics
from aligner.errors import TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds
from aligner.quant.quantize import CALIBRATE, QuantSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepPoint:
    settings: QuantSettings
    metric: str
    value: float  # worst over outputs and samples (nan: the setting failed)
    seconds: float
    error: str = ""

    def to_dict(self) -> dict:
        return {"settings": self.settings.describe(), "options": self.settings.options(), self.metric: None if math.isnan(self.value) else self.value,
                "seconds": round(self.seconds, 3), **({"error": self.error} if self.error else {})}


def candidate_settings(base: QuantSettings, methods: Sequence[str] = CALIBRATE, reduce_range: Sequence[bool] = (False, True)) -> list[QuantSettings]:
    """Calibration method x reduce_range, the base's other settings kept (types u8s8 by default, per-channel, symmetry, fallback)."""
    return [replace(base, calibrate=m, reduce_range=rr) for m in methods for rr in reduce_range]


def sweep_settings(graph: ModelGraph, target: Target, samples: Sequence[Feeds], metric: str = "rel_l2",
                   candidates: Sequence[QuantSettings] | None = None, executor=None,
                   expected: Sequence[dict] | None = None) -> tuple[Target, tuple[SweepPoint, ...]]:
    """``target`` with the best setting's options, and every point measured (full INT8, real kernels).
    ``executor`` (:mod:`aligner.search.executor`, started with :class:`aligner.search.int8.QuantizedTrialJob`)
    runs the settings at once; the points, their order and the choice are the serial sweep's."""
    from aligner.backends import reference_runner
    from aligner.quant.calib import report

    if expected is None:
        ref = reference_runner(graph)
        expected = [ref.run(dict(s)) for s in samples]
    candidates = candidates or candidate_settings(QuantSettings.of(target))
    tickets = [executor.submit(("sweep", tuple(sorted(c.options().items())), metric)) for c in candidates] if executor else []
    points = []
    for i, settings in enumerate(candidates):
        report(f"quantizer sweep: {settings.describe()}", i + 1, len(candidates))
        if executor is not None:
            outcome = executor.result(tickets[i])
            if outcome.error is not None and not isinstance(outcome.error, TargetRunError):
                raise outcome.error
            value, error, seconds = (math.nan, str(outcome.error), outcome.seconds) if outcome.error else (outcome.value, "", outcome.seconds)
        else:
            start = time.perf_counter()
            try:
                value, error = full_int8_error(graph, target.with_options(settings.options()), samples, expected, metric), ""
            except TargetRunError as exc:
                value, error = math.nan, str(exc)
            seconds = time.perf_counter() - start
        points.append(SweepPoint(settings, metric, value, seconds, error))
        log.info("sweep %s: %s %.4g", settings.describe(), metric, points[-1].value)
    ok = [p for p in points if not math.isnan(p.value)]
    if not ok:
        return target, tuple(points)
    best = (max if metric in HIGHER_IS_BETTER else min)(ok, key=lambda p: p.value)
    return target.with_options(best.settings.options()), tuple(points)


def full_int8_error(graph: ModelGraph, target: Target, samples: Sequence[Feeds], expected: Sequence[dict], metric: str) -> float:
    """The worst ``metric`` over outputs and samples of the whole model quantized for ``target`` (no node
    kept in float) on its real kernels; a TargetRunError when it cannot be quantized or run."""
    from aligner.backends import make_runner

    runner = make_runner(graph, target.with_pins(()))
    return max(_worst(metric, e, runner.run(dict(s))) for s, e in zip(samples, expected))


def _worst(metric: str, expected: dict, got: dict) -> float:
    values = [all_metrics(r, got[k])[metric] for k, r in expected.items() if np.asarray(r).dtype.kind == "f"]
    values = [math.inf if math.isnan(v) else v for v in values]
    if not values:
        return math.nan
    return min(values) if metric in HIGHER_IS_BETTER else max(values)


__all__ = ["SweepPoint", "candidate_settings", "full_int8_error", "sweep_settings"]
