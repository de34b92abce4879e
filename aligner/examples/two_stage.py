"""A small two-stage detector with NMS, built without torchvision (needs torch).

A scorer rates anchors, TopK keeps the best, NMS (exported as ONNX ``NonMaxSuppression``) removes
overlaps, and a second-stage head refines the kept boxes. ``features(tie=True)`` makes two anchors
tie at the TopK cut: ONNX's TopK keeps the lower index (its spec), this PyTorch implementation the
higher one (as a GPU kernel may; PyTorch does not specify tie order) — both correct, and what
follows differs. Used by the story-2 test and as the CPU stand-in of ``benchmarks/story2_maskrcnn.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

N_ANCHORS, K, FEATURES = 24, 6, 8


class _TopK(torch.autograd.Function):
    """Indices of the k largest scores; ties go to the higher index (ONNX TopK: the lower one)."""

    @staticmethod
    def forward(ctx, scores, k):
        order = torch.argsort(scores.flip(0), descending=True, stable=True)[:k]
        return scores.shape[0] - 1 - order

    @staticmethod
    def symbolic(g, scores, k):
        _, idx = g.op("TopK", scores, g.op("Constant", value_t=torch.tensor([k], dtype=torch.int64)), axis_i=0, largest_i=1,
                      sorted_i=1, outputs=2)
        return idx


class _NMS(torch.autograd.Function):
    """Greedy NMS over [K, 4] corner boxes in score order (suppress IoU > threshold), as ONNX's op."""

    @staticmethod
    def forward(ctx, boxes, scores, iou):
        order = torch.argsort(scores, descending=True, stable=True)
        keep = []
        for i in order.tolist():
            if all(_iou(boxes[i], boxes[j]) <= iou for j in keep):
                keep.append(i)
        return torch.tensor(keep, dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou):
        b = g.op("Unsqueeze", boxes, g.op("Constant", value_t=torch.tensor([0])))
        s = g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([0, 1])))
        sel = g.op("NonMaxSuppression", b, s, g.op("Constant", value_t=torch.tensor([K])), g.op("Constant", value_t=torch.tensor([iou])))
        return g.op("Gather", sel, g.op("Constant", value_t=torch.tensor(2)), axis_i=1)


def _iou(a, b) -> float:
    lo, hi = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
    inter = float(torch.clamp(hi - lo, min=0).prod())
    return inter / (float((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod()) - inter)


class _Scale(torch.autograd.Function):
    """A head layer whose export differs from eager (the injected fault of the control case)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.05

    @staticmethod
    def symbolic(g, x):
        return g.op("Identity", x)


class TopKSelect(nn.Module):
    def forward(self, scores):
        return _TopK.apply(scores, K)


class NMS(nn.Module):
    def forward(self, boxes, scores):
        return _NMS.apply(boxes, scores, 0.5)


class Head(nn.Module):
    def __init__(self, faulty: bool):
        super().__init__()
        self.fc1, self.fc2, self.faulty = nn.Linear(FEATURES + 4, 16), nn.Linear(16, 3 + 4), faulty

    def forward(self, features, boxes):
        h = torch.relu(self.fc1(torch.cat([features, boxes / 32.0], -1)))
        return self.fc2(_Scale.apply(h) if self.faulty else h)


class TwoStage(nn.Module):
    def __init__(self, faulty_head: bool = False):
        super().__init__()
        self.scorer = nn.Linear(FEATURES, 1)
        with torch.no_grad():  # exact arithmetic: the score of an anchor is its first feature
            self.scorer.weight.zero_()
            self.scorer.weight[0, 0] = 1.0
            self.scorer.bias.zero_()
        self.topk, self.nms, self.head = TopKSelect(), NMS(), Head(faulty_head)
        grid = torch.arange(N_ANCHORS, dtype=torch.float32)
        x0 = (grid % 6) * 10.0
        y0 = (grid // 6) * 10.0
        self.register_buffer("anchors", torch.stack([x0, y0, x0 + 8, y0 + 8], -1))  # disjoint: NMS keeps all K

    def forward(self, features):  # [N_ANCHORS, FEATURES]
        scores = self.scorer(features)[:, 0]
        picked = self.topk(scores)
        boxes, kept_scores = self.anchors[picked], scores[picked]
        keep = self.nms(boxes, kept_scores)
        rows = picked[keep]
        return self.head(features[rows], boxes[keep])


def features(tie: bool) -> np.ndarray:
    rng = np.random.default_rng(0)
    f = rng.integers(0, 4, size=(N_ANCHORS, FEATURES)).astype(np.float32)
    f[:, 0] = np.arange(N_ANCHORS, 0, -1, dtype=np.float32)[rng.permutation(N_ANCHORS)]  # distinct scores
    if tie:  # the K-th best and the one after it tie: indices lo < hi
        order = np.argsort(-f[:, 0], kind="stable")
        lo, hi = sorted(order[K - 1:K + 1])
        f[hi, 0] = f[lo, 0]
        f[hi, 1:] = f[lo, 1:] + 1  # different anchors, different features: the head sees the flip
    return f
