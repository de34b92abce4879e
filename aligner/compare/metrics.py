"""Error metrics: small pure functions ``(reference, test) -> float``.

They are computed over the elements that are finite on both sides (non-finite values are
counted separately, see :func:`nonfinite_counts`) in float64. Each metric is written once, in
:data:`FORMULAS`, as a formula over a few sums (:class:`Sums`) that one block-wise pass collects;
the single-metric functions and :func:`measure` (every metric, one pass) both read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EPS = 1e-12
MVRE_EPS = 1e-6  # |ref| below this counts as this in MVRE, so exact zeros do not divide by zero
CHUNK = 1 << 16  # elements per float64 block: two blocks and their temporaries stay in the cache


@dataclass(frozen=True)
class NonFinite:
    nan: int = 0
    posinf: int = 0
    neginf: int = 0

    @property
    def total(self) -> int:
        return self.nan + self.posinf + self.neginf


@dataclass(frozen=True)
class Sums:
    """What every metric is a formula of, over the ``n`` element pairs finite on both sides."""

    n: int = 0
    sum_abs: float = 0.0  # Σ|t − r|
    max_abs: float = 0.0  # max |t − r|
    err2: float = 0.0  # Σ(t − r)²
    ref2: float = 0.0  # Σr²
    test2: float = 0.0  # Σt²
    dot: float = 0.0  # Σr·t
    rel: float = 0.0  # Σ|t − r| / max(|r|, eps)


def _rel_l2(s: Sums) -> float:
    """‖test − ref‖ / ‖ref‖ (0 when both are zero)."""
    return s.err2**0.5 / max(s.ref2**0.5, EPS) if s.err2 else 0.0


def _cosine(s: Sums) -> float:
    nr, nt = s.ref2**0.5, s.test2**0.5
    return 1.0 if nr < EPS and nt < EPS else s.dot / max(nr * nt, EPS)


def _snr_db(s: Sums) -> float:
    """10·log10(‖ref‖² / ‖test − ref‖²); inf when identical."""
    return float("inf") if s.err2 == 0.0 else float(10 * np.log10(max(s.ref2, EPS) / s.err2))


FORMULAS: dict[str, Callable[[Sums], float]] = {
    "max_abs": lambda s: s.max_abs,
    "mean_abs": lambda s: s.sum_abs / s.n if s.n else 0.0,
    "rel_l2": _rel_l2,
    "mvre": lambda s: s.rel / s.n if s.n else 0.0,  # mean value of relative error: mean(|t − r| / max(|r|, eps))
    "cosine": _cosine,
    "snr_db": _snr_db,
}
HIGHER_IS_BETTER = {"cosine", "snr_db"}


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products by numpy's own loop: BLAS's threads cost milliseconds per call on a busy machine."""
    return float(np.einsum("i,i->", a, b))


def sums(ref: np.ndarray, test: np.ndarray, eps: float = MVRE_EPS) -> tuple[Sums, NonFinite, NonFinite]:
    """(:class:`Sums`, :func:`nonfinite_counts` of ``ref``, of ``test``) in one pass.

    Block by block in float64, so a tensor of any size costs a few cache-sized temporaries instead
    of float64 copies of the whole tensor; a block whose sums of squares are finite has no NaN/inf
    (a float32 square cannot overflow float64), so the element-wise finiteness test runs only on
    blocks that have some."""
    r, t = np.asarray(ref).ravel(), np.asarray(test).ravel()
    floating = r.dtype.kind in "fc" or t.dtype.kind in "fc"
    n = 0
    sum_ad = max_ad = err2 = ref2 = test2 = dot = rel = 0.0
    nf = [[0, 0, 0], [0, 0, 0]]
    for start in range(0, r.size, CHUNK):
        rc, tc = r[start:start + CHUNK].astype(np.float64), t[start:start + CHUNK].astype(np.float64)
        rr, tt = _dot(rc, rc), _dot(tc, tc)
        if floating and not (np.isfinite(rr) and np.isfinite(tt)):
            for side, block in enumerate((rc, tc)):
                nf[side][0] += int(np.isnan(block).sum())
                nf[side][1] += int(np.isposinf(block).sum())
                nf[side][2] += int(np.isneginf(block).sum())
            both = np.isfinite(rc) & np.isfinite(tc)
            rc, tc = rc[both], tc[both]
            rr, tt = _dot(rc, rc), _dot(tc, tc)
        if rc.size == 0:
            continue
        n += rc.size
        ref2, test2, dot = ref2 + rr, test2 + tt, dot + _dot(rc, tc)
        d = np.subtract(tc, rc, out=tc)
        err2 += _dot(d, d)
        ad = np.abs(d, out=d)
        max_ad = max(max_ad, float(ad.max()))
        sum_ad += float(ad.sum())
        scale = np.maximum(np.abs(rc, out=rc), eps, out=rc)
        rel += float(np.divide(ad, scale, out=scale).sum())
    return Sums(n, sum_ad, max_ad, err2, ref2, test2, dot, rel), NonFinite(*nf[0]), NonFinite(*nf[1])


def measure(ref: np.ndarray, test: np.ndarray) -> tuple[dict[str, float], NonFinite, NonFinite]:
    """(:func:`all_metrics`, :func:`nonfinite_counts` of ``ref``, of ``test``) in one pass."""
    s, nf_ref, nf_test = sums(ref, test)
    return {name: float(formula(s)) for name, formula in FORMULAS.items()}, nf_ref, nf_test


def all_metrics(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` over the elements finite on both sides, in float64."""
    return measure(ref, test)[0]


def _metric(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(ref: np.ndarray, test: np.ndarray) -> float:
        return float(FORMULAS[name](sums(ref, test)[0]))

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = f"{name} of ``test`` against ``ref`` (:data:`FORMULAS`), over the elements finite on both sides."
    return metric


max_abs = _metric("max_abs")
mean_abs = _metric("mean_abs")
rel_l2 = _metric("rel_l2")
cosine = _metric("cosine")
snr_db = _metric("snr_db")


def mvre(ref: np.ndarray, test: np.ndarray, eps: float = MVRE_EPS) -> float:
    """Mean value of relative error: mean(|test − ref| / max(|ref|, eps)), over the elements finite on both sides."""
    return float(FORMULAS["mvre"](sums(ref, test, eps)[0]))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "max_abs": max_abs,
    "mean_abs": mean_abs,
    "rel_l2": rel_l2,
    "mvre": mvre,
    "cosine": cosine,
    "snr_db": snr_db,
}


def nonfinite_counts(a: np.ndarray) -> NonFinite:
    if a.dtype.kind not in "fc":
        return NonFinite()
    return NonFinite(int(np.isnan(a).sum()), int(np.isposinf(a).sum()), int(np.isneginf(a).sum()))
