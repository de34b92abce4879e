"""From a detector's raw outputs to COCO detections, and the MVRE of outputs between targets.

An adapter is any callable ``(outputs, image_sizes) -> list[Detections]`` (one per image of the
batch); three are built in: DETR-style set prediction, boxes/scores/labels, YOLO-style grids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from aligner.compare.metrics import mvre as metric_mvre
from aligner.errors import InputError

MVRE_EPS = 1e-6  # |r| below this counts as this, so exact zeros do not divide by zero


@dataclass(frozen=True)
class Detections:
    """One image's detections: boxes as absolute ``[x, y, w, h]`` (COCO), scores, class labels."""

    boxes: np.ndarray  # [N, 4]
    scores: np.ndarray  # [N]
    labels: np.ndarray  # [N] (model label ids; map to COCO category ids with ``label_map``)

    def to_coco(self, image_id: int, label_map: Mapping[int, int] | None = None) -> list[dict]:
        out = []
        for box, score, label in zip(self.boxes, self.scores, self.labels):
            if not (np.all(np.isfinite(box)) and np.isfinite(score)):
                continue  # a non-finite detection cannot be scored; the image is reported as non-finite
            if label_map is not None and int(label) not in label_map:
                raise InputError(f"The model predicts label {int(label)}, which the label map does not cover "
                                 f"(it maps {sorted(label_map)[:10]} to category ids); use --label-map contiguous for "
                                 "labels 0..C-1, or identity when labels are already the category ids.")
            category = label_map[int(label)] if label_map is not None else int(label)
            out.append({"image_id": int(image_id), "category_id": category,
                        "bbox": [round(float(v), 3) for v in box], "score": float(score)})
        return out


Adapter = Callable[[Mapping[str, np.ndarray], Sequence[tuple[int, int]]], list[Detections]]


def _need(outputs: Mapping[str, np.ndarray], names: Sequence[str], adapter: str) -> list[np.ndarray]:
    missing = [n for n in names if n not in outputs]
    if missing:
        raise InputError(f"The {adapter} adapter needs outputs {list(names)}, but the model gave "
                         f"{ {k: tuple(np.shape(v)) for k, v in outputs.items()} }. Pass the output names "
                         "(e.g. --adapter-outputs logits,boxes) or choose another adapter.")
    return [np.asarray(outputs[n]) for n in names]


def detr_adapter(logits: str = "logits", boxes: str = "boxes", top_k: int = 100, background_last: bool = True) -> Adapter:
    """DETR-style: class logits ``[B, Q, C(+1)]`` (softmax, last class = no-object) and normalized
    ``cx, cy, w, h`` boxes ``[B, Q, 4]``."""

    def adapt(outputs, image_sizes):
        lg, bx = _need(outputs, (logits, boxes), "detr")
        if lg.ndim != 3 or bx.ndim != 3 or bx.shape[-1] != 4:
            raise InputError(f"detr adapter: expected logits [B, Q, C] and boxes [B, Q, 4], got {lg.shape} and {bx.shape}.")
        z = lg - lg.max(axis=-1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
        if background_last:
            prob = prob[..., :-1]
        dets = []
        for b, (h, w) in enumerate(image_sizes):
            scores, labels = prob[b].max(-1), prob[b].argmax(-1)
            order = np.argsort(-scores, kind="stable")[:top_k]
            cx, cy, bw, bh = (bx[b, order, i] for i in range(4))
            xywh = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], axis=-1)
            dets.append(Detections(xywh, scores[order], labels[order]))
        return dets

    return adapt


def boxes_scores_labels_adapter(boxes: str = "boxes", scores: str = "scores", labels: str = "labels", xyxy: bool = True) -> Adapter:
    """Models that output final detections: boxes ``[B, N, 4]`` (absolute xyxy or xywh), scores, labels."""

    def adapt(outputs, image_sizes):
        bx, sc, lb = _need(outputs, (boxes, scores, labels), "boxes/scores/labels")
        dets = []
        for b in range(len(image_sizes)):
            box = bx[b].astype(np.float64)
            if xyxy:
                box = np.stack([box[:, 0], box[:, 1], box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], axis=-1)
            dets.append(Detections(box, sc[b], lb[b]))
        return dets

    return adapt


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    x1, y1, x2, y2 = boxes_xyxy.T
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    while order.size:
        i = order[0]
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(xx2 - xx1, 0) * np.maximum(yy2 - yy1, 0)
        overlap = inter / np.maximum(area[i] + area[order[1:]] - inter, 1e-12)
        order = order[1:][overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def yolo_adapter(output: str = "output", conf: float = 0.001, iou: float = 0.65, max_det: int = 300) -> Adapter:
    """YOLO-style ``[B, N, 5 + C]`` rows of (cx, cy, w, h in input pixels, objectness, class scores),
    per-class NMS. Image sizes are the network input sizes (letterbox undone by the caller)."""

    def adapt(outputs, image_sizes):
        (pred,) = _need(outputs, (output,), "yolo")
        if pred.ndim != 3 or pred.shape[-1] < 6:
            raise InputError(f"yolo adapter: expected [B, N, 5 + classes], got {pred.shape}.")
        dets = []
        for b in range(len(image_sizes)):
            p = pred[b]
            cls = p[:, 5:] * p[:, 4:5]
            labels, scores = cls.argmax(-1), cls.max(-1)
            ok = scores >= conf
            p, labels, scores = p[ok], labels[ok], scores[ok]
            xyxy = np.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2, p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2], -1)
            offset = labels[:, None] * (xyxy.max(initial=0) + 1)  # per-class NMS in one call
            keep = nms(xyxy + offset, scores, iou)[:max_det]
            xywh = np.stack([xyxy[keep, 0], xyxy[keep, 1], p[keep, 2], p[keep, 3]], -1)
            dets.append(Detections(xywh, scores[keep], labels[keep]))
        return dets

    return adapt


ADAPTERS: dict[str, Callable[..., Adapter]] = {"detr": detr_adapter, "boxes": boxes_scores_labels_adapter, "yolo": yolo_adapter}


def output_mvre(reference: np.ndarray, target: np.ndarray, eps: float = MVRE_EPS) -> float:
    """MVRE of one output over the elements finite on both sides (NaN if none): the metric of
    :func:`aligner.compare.metrics.mvre`, mean of |t − r| / max(|r|, eps)."""
    r, t = np.asarray(reference, np.float64), np.asarray(target, np.float64)
    ok = np.isfinite(r) & np.isfinite(t)
    return metric_mvre(r[ok], t[ok], eps) if ok.any() else float("nan")


__all__ = ["ADAPTERS", "Adapter", "Detections", "MVRE_EPS", "boxes_scores_labels_adapter", "detr_adapter", "nms", "output_mvre", "yolo_adapter"]
