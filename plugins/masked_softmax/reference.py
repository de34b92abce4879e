"""NumPy reference of MaskedSoftmax: the ground truth for tests, the emulator and the search."""

from __future__ import annotations

import numpy as np

FLT_MIN = float(np.finfo(np.float32).min)


def masked_softmax(scores: np.ndarray, keep: np.ndarray, axis: int = -1, fill: float = FLT_MIN) -> np.ndarray:
    """softmax(scores + (keep ? 0 : fill)) along ``axis``, in FP32 (``fill`` clamped to -FLT_MAX)."""
    x = np.asarray(scores, dtype=np.float32)
    bias = np.where(np.asarray(keep, dtype=bool), np.float32(0), np.float32(max(fill, FLT_MIN)))
    with np.errstate(over="ignore", invalid="ignore"):
        z = x + bias
        z = z - z.max(axis=axis, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
