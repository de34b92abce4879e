"""The GPU implementation (Triton) that the TensorRT plugin launches: one program per row."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _masked_softmax(x_ptr, keep_ptr, y_ptr, n_cols, fill, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(keep_ptr + row * n_cols + cols, mask=inside, other=0)
    z = tl.where(keep != 0, x, x + fill)
    z = tl.where(inside, z, float("-inf"))
    z = z - tl.max(z, axis=0)
    e = tl.where(inside, tl.exp(z), 0.0)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def launch(inputs, outputs, attrs, stream=None) -> None:
    """``inputs`` = [scores, keep] and ``outputs`` = [probs] as torch CUDA tensors (FP32/FP16/BF16
    scores; keep broadcast to the scores' shape here). Softmax over the last axis."""
    import torch

    scores, keep = inputs
    (probs,) = outputs
    if attrs.get("axis", -1) not in (-1, scores.dim() - 1):
        raise ValueError("the MaskedSoftmax kernel takes the last axis (the pass only fuses those)")
    keep = keep.to(torch.uint8).expand(scores.shape).contiguous()
    scores = scores.contiguous()
    n = scores.shape[-1]
    rows = scores.numel() // max(n, 1)
    grid = (rows,)
    with torch.cuda.stream(stream) if stream is not None else torch.cuda.device(scores.device):
        _masked_softmax[grid](scores, keep, probs, n, max(float(attrs.get("fill")), -3.4028234663852886e38),
                              BLOCK=triton.next_power_of_2(max(n, 16)))
