"""When a tensor diverges: tolerances per target precision, apart from the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aligner.compare.metrics import HIGHER_IS_BETTER, METRICS, NonFinite
from aligner.errors import InputError


@dataclass(frozen=True)
class Tolerance:
    """A tensor diverges when its non-finite pattern differs from the reference, or when
    ``metric`` is worse than ``threshold`` and the largest absolute error exceeds ``atol``
    (so tensors that are ~0 on both sides do not diverge on relative metrics)."""

    metric: str = "rel_l2"
    threshold: float = 1e-4
    atol: float = 1e-5

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InputError(f"Unknown metric {self.metric!r}; choose from {sorted(METRICS)}.")
        for name in ("threshold", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or (name == "atol" and value < 0):
                raise InputError(f"Tolerance {name} must be a finite number{' >= 0' if name == 'atol' else ''}; got {value!r}.")

    def describe(self) -> str:
        """``rel_l2 <= 0.02 (and max_abs > 0.001)``: the rule as printed in every verdict."""
        op = ">=" if self.metric in HIGHER_IS_BETTER else "<="
        return f"{self.metric} {op} {self.threshold:g} (or max_abs <= {self.atol:g})"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "threshold": self.threshold, "atol": self.atol}

    def exceeded(self, metrics: dict[str, float]) -> bool:
        value = metrics[self.metric]
        worse = value < self.threshold if self.metric in HIGHER_IS_BETTER else value > self.threshold
        return bool(worse and metrics["max_abs"] > self.atol)


# FP16 rounds each stored value with relative error up to 2^-11 (4.9e-4); BF16 up to 2^-8 (3.9e-3).
# The defaults allow that error to grow through a few dozen layers before calling a tensor divergent.
DEFAULT_TOLERANCES = {
    "fp32": Tolerance("rel_l2", 1e-4, 1e-5),
    "tf32": Tolerance("rel_l2", 5e-3, 1e-4),
    "fp16": Tolerance("rel_l2", 2e-2, 1e-3),
    "bf16": Tolerance("rel_l2", 1e-1, 1e-2),
    # INT8 (8-bit uniform steps of a calibrated range): a few % per tensor is normal quantization noise.
    "int8": Tolerance("rel_l2", 5e-2, 1e-2),
}
LOOSENESS = ("fp32", "tf32", "fp16", "bf16", "int8")  # autocast computes in FP16: judged as fp16
# Thresholds of the other metrics when only --metric is given (no --threshold).
METRIC_DEFAULTS = {"cosine": 0.999, "snr_db": 40.0, "max_abs": 1e-3, "mean_abs": 1e-4, "mvre": 1e-2}


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get("fp16" if precision == "autocast" else precision, DEFAULT_TOLERANCES["fp32"])


def tolerance_for(target, reference=None, metric: str = "rel_l2", threshold: float | None = None,
                  atol: float | None = None) -> Tolerance:
    """The one tolerance policy: the default of the lower of the two precisions compared (the
    target's, or the reference's when that is lower), whatever the command and whether the target
    runs the same graph or a second one; ``metric`` / ``threshold`` / ``atol`` override parts of it.

    ``target`` and ``reference`` are :class:`~aligner.backends.target.Target` values."""
    precisions = [p if p != "autocast" else "fp16" for p in (target.precision, reference.precision if reference else "fp32")]
    base = default_tolerance(max(precisions, key=lambda p: LOOSENESS.index(p) if p in LOOSENESS else 0))
    if threshold is None:
        threshold = base.threshold if metric == base.metric else METRIC_DEFAULTS.get(metric, base.threshold)
    return Tolerance(metric, threshold, base.atol if atol is None else atol)


def nonfinite_differs(ref: np.ndarray, test: np.ndarray, nf_ref: NonFinite, nf_test: NonFinite) -> bool:
    if nf_ref == nf_test and nf_ref.total == 0:
        return False
    if nf_ref != nf_test:
        return True
    r, t = np.asarray(ref), np.asarray(test)
    return bool(np.any(np.isnan(r) != np.isnan(t)) or np.any(np.isinf(r) != np.isinf(t)))
