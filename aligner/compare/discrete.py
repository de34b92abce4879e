"""Discrete choices (indices, booleans, rounding) and how close a choice was to flipping.

A TopK, an NMS or an ArgMax picks; when two candidates are tied or nearly tied, two correct
implementations (PyTorch and ONNX Runtime, CPU and GPU) may pick differently, and everything
downstream then differs a lot without any arithmetic being wrong. :func:`decision_margin` measures,
on one side's values of a choice node's inputs, how far the closest decision was from going the
other way (0 for an exact tie), relative to the scale of the values it compares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Ops whose output is a choice (indices, booleans, rounding): a tiny input error flips it, and
# everything downstream then differs a lot without any arithmetic being wrong.
DISCRETE_OPS = frozenset({
    "ArgMax", "ArgMin", "TopK", "NonMaxSuppression", "NonZero", "Unique", "Greater", "Less", "Equal",
    "GreaterOrEqual", "LessOrEqual", "Round", "Floor", "Ceil", "Sign", "Hardmax", "Mod",
})
NMS_MAX_BOXES = 2000  # IoU margins over the best-scored boxes only (pairs grow quadratically)


@dataclass(frozen=True)
class Margin:
    """The closest call of a choice: ``relative`` = gap / scale of the compared values (0 = a tie)."""

    gap: float  # in the units of the values compared
    relative: float
    what: str  # which decision, in words

    def to_dict(self) -> dict:
        return {"gap": self.gap, "relative": self.relative, "what": self.what}


def decision_margin(op_type: str, inputs: Sequence[np.ndarray | None], attrs: Mapping[str, object] | None = None) -> Margin | None:
    """The margin of the decision ``op_type`` made on ``inputs`` (None: not a float choice it can measure)."""
    attrs = dict(attrs or {})
    x = _float(inputs[0]) if inputs else None
    if op_type == "TopK" and x is not None and len(inputs) > 1 and inputs[1] is not None:
        k = int(np.ravel(inputs[1])[0])
        axis = int(attrs.get("axis", -1))
        largest = int(attrs.get("largest", 1))
        ranked = np.sort(np.moveaxis(x, axis, -1), axis=-1)
        ranked = ranked[..., ::-1] if largest else ranked
        head = ranked[..., : k + 1]  # the order of the k picked and the one left out
        return _gaps(head, x, f"between consecutive values among the top {k} + 1 along axis {axis}")
    if op_type in ("ArgMax", "ArgMin", "Hardmax") and x is not None:
        axis = int(attrs.get("axis", 0 if op_type != "Hardmax" else -1))
        ranked = np.sort(np.moveaxis(x, axis, -1), axis=-1)
        ranked = ranked[..., ::-1] if op_type != "ArgMin" else ranked
        return _gaps(ranked[..., :2], x, f"between the best two values along axis {axis}")
    if op_type in ("Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual") and len(inputs) == 2:
        a, b = _float(inputs[0]), _float(inputs[1])
        if a is None or b is None:
            return None
        diff = np.abs(np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)) - b)
        scale = max(float(np.max(np.abs(a), initial=0)), float(np.max(np.abs(b), initial=0)), 1e-30)
        gap = float(diff.min(initial=np.inf))
        return Margin(gap, gap / scale, "between the compared values")
    if op_type in ("Round", "Floor", "Ceil") and x is not None:
        frac = x - np.floor(x)
        gap = float(np.min(np.abs(frac - 0.5)) if op_type == "Round" else np.min(np.minimum(frac, 1 - frac)))
        return Margin(gap, gap, "to the nearest rounding boundary")
    if op_type == "NonMaxSuppression" and len(inputs) >= 2:
        return _nms_margin(inputs)
    return None


def _float(a) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" and a.size else None


def _gaps(head: np.ndarray, x: np.ndarray, what: str) -> Margin | None:
    if head.shape[-1] < 2:
        return None
    gaps = np.abs(np.diff(head, axis=-1))
    gaps = gaps[np.isfinite(gaps)]
    if not gaps.size:
        return None
    scale = max(float(np.max(np.abs(x[np.isfinite(x)]), initial=0)), 1e-30)
    gap = float(gaps.min())
    return Margin(gap, gap / scale, what)


def _nms_margin(inputs: Sequence) -> Margin | None:
    """Ties among the scores NMS ranks, and IoUs next to its threshold (whichever is closer)."""
    boxes, scores = _float(inputs[0]), _float(inputs[1])
    if boxes is None or scores is None:
        return None
    iou_thr = float(np.ravel(inputs[3])[0]) if len(inputs) > 3 and inputs[3] is not None and np.size(inputs[3]) else 0.0
    score_thr = float(np.ravel(inputs[4])[0]) if len(inputs) > 4 and inputs[4] is not None and np.size(inputs[4]) else -np.inf
    best: Margin | None = None
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c]
            keep = np.flatnonzero(s > score_thr)
            keep = keep[np.argsort(-s[keep], kind="stable")][:NMS_MAX_BOXES]
            if keep.size < 2:
                continue
            ranked = s[keep]
            scale = max(float(np.max(np.abs(ranked))), 1e-30)
            gap = float(np.min(np.abs(np.diff(ranked))))
            best = _closer(best, Margin(gap, gap / scale, "between the scores NMS ranks"))
            iou = _iou(boxes[b, keep])
            upper = iou[np.triu_indices(len(keep), 1)]
            upper = upper[upper > 0]  # boxes that do not touch are never a close call
            if upper.size:
                gap = float(np.min(np.abs(upper - iou_thr)))
                best = _closer(best, Margin(gap, gap, f"between an IoU and the IoU threshold {iou_thr:g}"))
    return best


def _closer(a: Margin | None, b: Margin) -> Margin:
    return b if a is None or b.relative < a.relative else a


def _iou(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [y1, x1, y2, x2] (or x/y swapped: IoU does not care) corner boxes."""
    lo = np.minimum(boxes[:, :2], boxes[:, 2:])
    hi = np.maximum(boxes[:, :2], boxes[:, 2:])
    area = np.prod(hi - lo, axis=1)
    inter = np.prod(np.clip(np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None]), 0, None), axis=2)
    return inter / np.maximum(area[:, None] + area[None] - inter, 1e-30)


__all__ = ["DISCRETE_OPS", "Margin", "decision_margin"]
