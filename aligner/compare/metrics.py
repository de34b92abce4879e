"""Error metrics: small pure functions ``(reference, test) -> float``.

They are computed over the elements that are finite on both sides (non-finite values are
counted separately, see :func:`nonfinite_counts`) in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-12


def max_abs(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.max(np.abs(test - ref))) if ref.size else 0.0


def mean_abs(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.mean(np.abs(test - ref))) if ref.size else 0.0


def rel_l2(ref: np.ndarray, test: np.ndarray) -> float:
    """‖test − ref‖ / ‖ref‖ (0 when both are zero)."""
    err = float(np.linalg.norm((test - ref).ravel()))
    return err / max(float(np.linalg.norm(ref.ravel())), EPS) if err else 0.0


def mvre(ref: np.ndarray, test: np.ndarray, eps: float = 1e-6) -> float:
    """Mean value of relative error: mean(|test − ref| / max(|ref|, eps))."""
    return float(np.mean(np.abs(test - ref) / np.maximum(np.abs(ref), eps))) if ref.size else 0.0


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    nr, nt = float(np.linalg.norm(ref.ravel())), float(np.linalg.norm(test.ravel()))
    if nr < EPS and nt < EPS:
        return 1.0
    return float(np.dot(ref.ravel(), test.ravel()) / max(nr * nt, EPS))


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-noise ratio in dB: 10·log10(‖ref‖² / ‖test − ref‖²); inf when identical."""
    noise = float(np.sum(np.square(test - ref)))
    if noise == 0.0:
        return float("inf")
    return float(10 * np.log10(max(float(np.sum(np.square(ref))), EPS) / noise))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "max_abs": max_abs,
    "mean_abs": mean_abs,
    "rel_l2": rel_l2,
    "mvre": mvre,
    "cosine": cosine,
    "snr_db": snr_db,
}
HIGHER_IS_BETTER = {"cosine", "snr_db"}


@dataclass(frozen=True)
class NonFinite:
    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    @property
    def total(self) -> int:
        return self.nan + self.posinf + self.neginf


def nonfinite_counts(a: np.ndarray) -> NonFinite:
    if a.dtype.kind not in "fc":
        return NonFinite()
    return NonFinite(int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum()))


def all_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` over the elements finite on both sides, in float64.

    Same definitions as the functions above, computed from one difference array so that large
    tensors are traversed a few times instead of once per metric.
    """
    r = np.asarray(ref, dtype=np.float64).ravel()
    t = np.asarray(test, dtype=np.float64).ravel()
    both = np.isfinite(r) & np.isfinite(t)
    if not both.all():
        r, t = r[both], t[both]
    if r.size == 0:
        return {name: 0.0 for name in METRICS} | {"cosine": 1.0, "snr_db": float("inf")}
    d = t - r
    ad = np.abs(d)
    err2 = float(np.dot(d, d))
    ref2, test2 = float(np.dot(r, r)), float(np.dot(t, t))
    nr, nt = ref2**0.5, test2**0.5
    return {
        "max_abs": float(ad.max()),
        "mean_abs": float(ad.mean()),
        "rel_l2": err2**0.5 / max(nr, EPS) if err2 else 0.0,
        "mvre": float(np.mean(ad / np.maximum(np.abs(r), 1e-6))),
        "cosine": 1.0 if nr < EPS and nt < EPS else float(np.dot(r, t)) / max(nr * nt, EPS),
        "snr_db": float("inf") if err2 == 0.0 else float(10 * np.log10(max(ref2, EPS) / err2)),
    }
