"""The GPU implementation (Triton) that the TensorRT plugin launches: one program per output
bin of one box, all channels of the bin at once, FP32 accumulation."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bilinear(f_ptr, chan, H, W, y, x, cmask):
    valid = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    yl = y.to(tl.int32)
    xl = x.to(tl.int32)
    y_end = yl >= H - 1
    x_end = xl >= W - 1
    yl = tl.where(y_end, H - 1, yl)
    xl = tl.where(x_end, W - 1, xl)
    yh = tl.where(y_end, H - 1, yl + 1)
    xh = tl.where(x_end, W - 1, xl + 1)
    y = tl.where(y_end, yl.to(tl.float32), y)
    x = tl.where(x_end, xl.to(tl.float32), x)
    ly = y - yl
    lx = x - xl
    base = f_ptr + chan * H * W
    v = (tl.load(base + yl * W + xl, mask=cmask, other=0.0).to(tl.float32) * (1 - ly) * (1 - lx)
         + tl.load(base + yl * W + xh, mask=cmask, other=0.0).to(tl.float32) * (1 - ly) * lx
         + tl.load(base + yh * W + xl, mask=cmask, other=0.0).to(tl.float32) * ly * (1 - lx)
         + tl.load(base + yh * W + xh, mask=cmask, other=0.0).to(tl.float32) * ly * lx)
    return tl.where(valid, v, 0.0)


@triton.jit
def _roi_align(x_ptr, rois_ptr, idx_ptr, y_ptr, C, H, W, OH, OW, sampling_ratio, spatial_scale, offset,
               aligned: tl.constexpr, IS_MAX: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0)
    bin_ = tl.program_id(1)
    ph = bin_ // OW
    pw = bin_ % OW
    x1 = tl.load(rois_ptr + r * 4 + 0) * spatial_scale - offset
    y1 = tl.load(rois_ptr + r * 4 + 1) * spatial_scale - offset
    x2 = tl.load(rois_ptr + r * 4 + 2) * spatial_scale - offset
    y2 = tl.load(rois_ptr + r * 4 + 3) * spatial_scale - offset
    rw = x2 - x1
    rh = y2 - y1
    if not aligned:
        rw = tl.maximum(rw, 1.0)
        rh = tl.maximum(rh, 1.0)
    bh = rh / OH
    bw = rw / OW
    gh = tl.where(sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(rh / OH), 1.0).to(tl.int32))
    gw = tl.where(sampling_ratio > 0, sampling_ratio, tl.maximum(tl.ceil(rw / OW), 1.0).to(tl.int32))
    b = tl.load(idx_ptr + r)
    chans = tl.arange(0, BLOCK_C)
    cmask = chans < C
    f_ptr = x_ptr + b * C * H * W
    if IS_MAX:
        acc = tl.full([BLOCK_C], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_C], tl.float32)
    for iy in range(0, gh):
        y = y1 + ph * bh + (iy + 0.5) * bh / gh
        for ix in range(0, gw):
            x = x1 + pw * bw + (ix + 0.5) * bw / gw
            v = _bilinear(f_ptr, chans, H, W, y, x, cmask)
            if IS_MAX:
                acc = tl.maximum(acc, v)
            else:
                acc += v
    if not IS_MAX:
        acc = acc / (gh * gw).to(tl.float32)
    out = y_ptr + r * C * OH * OW + chans * OH * OW + ph * OW + pw
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def launch(inputs, outputs, attrs, stream=None) -> None:
    """``inputs`` = [X, rois (FP32), batch_indices (int64)], ``outputs`` = [Y], torch CUDA tensors."""
    import torch

    x, rois, idx = (t.contiguous() for t in inputs)
    (y,) = outputs
    n, c, h, w = x.shape
    oh, ow = int(attrs["output_height"]), int(attrs["output_width"])
    aligned = bool(attrs.get("aligned", 1))
    grid = (rois.shape[0], oh * ow)
    with torch.cuda.stream(stream) if stream is not None else torch.cuda.device(x.device):
        _roi_align[grid](x, rois.float(), idx, y, c, h, w, oh, ow, int(attrs.get("sampling_ratio", 0)),
                         float(attrs.get("spatial_scale", 1.0)), 0.5 if aligned else 0.0,
                         aligned=aligned, IS_MAX=attrs.get("mode", "avg") == "max", BLOCK_C=triton.next_power_of_2(max(c, 16)))
