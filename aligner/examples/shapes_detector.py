"""The example detector's architecture (PyTorch; imported only to train or re-export it).

A small transformer detector with a dense head, for the synthetic shapes of ``datasets/``:

* it reads **raw 0–255 pixels** (no normalisation layer in front, as many deployed models do);
* a ConvNeXt-style stem: a 4×4 stride-4 convolution of the raw pixels, then a LayerNorm over
  channels. The convolution is linear in pixels of 0–255, so its outputs deviate from their
  channel mean by hundreds; the LayerNorm makes the loss blind to that scale, so training never
  shrinks it. ONNX opset ≤ 16 exports the LayerNorm decomposed (``ReduceMean → Sub → Pow →
  ReduceMean → Add → Sqrt → Div``) and the ``Pow`` squares those deviations past FP16's 65504:
  the genuine FP16 problem. Then a 3×3 conv, a 2×2 stride-2 conv (16×16 tokens) and two pre-norm
  transformer encoder layers;
* a dense head per token: class scores (sigmoid) and a box (cell offset + log size), emitted in
  the YOLO row layout ``[cx, cy, w, h, objectness=1, p(square), p(disc), p(triangle)]`` so the
  built-in ``yolo`` adapter (per-class NMS) decodes it.
"""

from __future__ import annotations

STRIDE = 8
SIZE = 128
CLASSES = 3


def build(dim: int = 96, layers: int = 2, heads: int = 4):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class ShapesDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.patchify = nn.Conv2d(3, 64, 4, stride=4)  # ConvNeXt-style stem on raw pixels
            self.stem_norm = nn.LayerNorm(64)  # over channels: its input is in the hundreds
            self.stem = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, dim, 2, stride=2))
            grid = SIZE // STRIDE
            self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(dim)
            self.cls = nn.Linear(dim, CLASSES)
            self.box = nn.Linear(dim, 4)
            ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            self.register_buffer("cells", torch.stack([xs, ys], -1).reshape(1, grid * grid, 2).float())
            nn.init.constant_(self.cls.bias, -4.0)  # rare positives: start near p = 0.02

        def raw(self, pixels):  # raw 0-255 RGB, [B, 3, 128, 128] -> class logits, box regression
            x = self.stem_norm(self.patchify(pixels).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = self.stem(x).flatten(2).transpose(1, 2) + self.pos
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            return self.cls(x), self.box(x)

        def forward(self, pixels):
            return self.decode(*self.raw(pixels))

        def decode(self, logits, reg):
            centre = (self.cells + torch.sigmoid(reg[..., :2])) * STRIDE
            size = torch.exp(reg[..., 2:].clamp(max=4.0)) * STRIDE
            ones = torch.ones_like(logits[..., :1])
            return torch.cat([centre, size, ones, torch.sigmoid(logits)], -1)

    return ShapesDetector()


__all__ = ["CLASSES", "SIZE", "STRIDE", "build"]
