"""NumPy reference of RoIAlign (torchvision / mmcv semantics), vectorized per box."""

from __future__ import annotations

import math

import numpy as np


def _axis_weights(coords: np.ndarray, size: int):
    """Bilinear indices and weights along one axis, the torchvision rules: samples outside
    [-1, size] contribute 0; others are clamped to the border."""
    valid = (coords >= -1.0) & (coords <= size)
    c = np.maximum(coords, 0.0)
    low = np.floor(c).astype(np.int64)
    at_end = low >= size - 1
    low = np.where(at_end, size - 1, low)
    high = np.where(at_end, size - 1, low + 1)
    c = np.where(at_end, low.astype(coords.dtype), c)
    frac = c - low
    return low, high, 1.0 - frac, frac, valid


def roi_align(X: np.ndarray, rois: np.ndarray, batch_indices: np.ndarray, output_height: int = 1, output_width: int = 1,
              sampling_ratio: int = 0, spatial_scale: float = 1.0, mode: str = "avg", aligned: int = 1) -> np.ndarray:
    x = np.asarray(X, dtype=np.float32)
    boxes = np.asarray(rois, dtype=np.float32).reshape(-1, 4)
    n, c, h, w = x.shape
    oh, ow = int(output_height), int(output_width)
    out = np.zeros((boxes.shape[0], c, oh, ow), np.float32)
    offset = 0.5 if aligned else 0.0
    indices = np.asarray(batch_indices).reshape(-1)
    if indices.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} boxes but {indices.shape[0]} batch indices")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"batch_indices must be in [0, {n}) for a batch of {n} feature maps; got {indices.min()}..{indices.max()}")
    for r, (box, b) in enumerate(zip(boxes, indices)):
        x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in box)
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / oh), 1)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / ow), 1)
        ys = (y1 + (np.arange(oh)[:, None] + (np.arange(gh)[None, :] + 0.5) / gh) * bh).ravel()
        xs = (x1 + (np.arange(ow)[:, None] + (np.arange(gw)[None, :] + 0.5) / gw) * bw).ravel()
        yl, yh, wyl, wyh, vy = _axis_weights(ys, h)
        xl, xh, wxl, wxh, vx = _axis_weights(xs, w)
        f = x[int(b)]
        rows = f[:, yl, :] * wyl[None, :, None] + f[:, yh, :] * wyh[None, :, None]  # [C, oh*gh, W]
        vals = rows[:, :, xl] * wxl[None, None, :] + rows[:, :, xh] * wxh[None, None, :]  # [C, oh*gh, ow*gw]
        vals = vals * (vy[:, None] & vx[None, :])[None]
        vals = vals.reshape(c, oh, gh, ow, gw)
        out[r] = vals.max(axis=(2, 4)) if mode == "max" else vals.mean(axis=(2, 4))
    return out
