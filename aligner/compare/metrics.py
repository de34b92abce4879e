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
    """Every metric of :data:`METRICS` over the elements finite on both sides, in float64 (same
    definitions as the functions above)."""
    return measure(ref, test)[0]


CHUNK = 1 << 16  # elements per float64 block: two blocks and their temporaries stay in the cache


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of products by numpy's own loop: BLAS's threads cost milliseconds per call on a busy machine."""
    return float(np.einsum("i,i->", a, b))


def measure(ref: np.ndarray, test: np.ndarray) -> tuple[dict[str, float], NonFinite, NonFinite]:
    """(:func:`all_metrics`, :func:`nonfinite_counts` of ``ref``, of ``test``) in one pass.

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
        scale = np.maximum(np.abs(rc, out=rc), 1e-6, out=rc)
        rel += float(np.divide(ad, scale, out=scale).sum())
    nonfinite = (NonFinite(*nf[0]), NonFinite(*nf[1]))
    if n == 0:
        return {name: 0.0 for name in METRICS} | {"cosine": 1.0, "snr_db": float("inf")}, *nonfinite
    nr, nt = ref2**0.5, test2**0.5
    metrics = {
        "max_abs": max_ad,
        "mean_abs": sum_ad / n,
        "rel_l2": err2**0.5 / max(nr, EPS) if err2 else 0.0,
        "mvre": rel / n,
        "cosine": 1.0 if nr < EPS and nt < EPS else dot / max(nr * nt, EPS),
        "snr_db": float("inf") if err2 == 0.0 else float(10 * np.log10(max(ref2, EPS) / err2)),
    }
    return metrics, *nonfinite
