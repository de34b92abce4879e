"""A small AnchorDETR-like detector that takes padded batches with a pixel mask (PyTorch; imported
only to train or export it — ``benchmarks/story1.py`` does both).

Images of different sizes share one batch: each is placed at the top-left of a 128×128 canvas,
the rest is zero padding, and ``mask`` [B, 128, 128] (bool, True on padding) says where — the
``NestedTensor`` of DETR. The mask matters: attention must not look at padded positions.

* it reads **raw 0–255 pixels**, like the shipped shapes detector: a 4×4 stride-4 convolution,
  a LayerNorm over channels, a 3×3 conv and a 2×2 stride-2 conv give 16×16 tokens (stride 8);
* the mask is resized to the tokens (nearest, as DETR) and gives the positional encoding
  (sine of the cumulative count of valid tokens along each axis, DETR's ``PositionEmbeddingSine``
  without normalisation — the "Mask2Pos" step of the AnchorDETR write-up);
* two post-norm encoder layers (self-attention) and two post-norm decoder layers (self-attention
  among the queries, cross-attention to the encoder's tokens); every attention over tokens adds
  ``Where(mask, finfo(float32).min, 0)`` to its scores before the Softmax, as HF's DETR family does.
  Exported at opset 16 this is the ``Softmax(Add(scores, Where(...)))`` pattern and every
  LayerNorm is decomposed (``ReduceMean → Sub → Pow → ReduceMean → Add → Sqrt → Div``);
* 256 object queries are **anchor points** on the 16×16 grid (AnchorDETR): each query's position
  embedding is the sine of its anchor, and it predicts its box around its anchor. Outputs DETR's:
  ``logits`` [B, 256, 3 + 1] (last class = no object) and ``boxes`` [B, 256, 4] (cx, cy, w, h,
  normalised to the 128×128 canvas), read by aligner's ``detr`` adapter.

Training (``benchmarks/story1.py``) assigns each object to the free query nearest its centre
(a fixed one-to-one assignment instead of Hungarian matching, so it trains in minutes) with
cross-entropy on the classes (no-object weight 0.1, as DETR) and L1 on the boxes.
"""

from __future__ import annotations

import math

CANVAS = 128
STRIDE = 8
GRID = CANVAS // STRIDE  # 16 x 16 tokens and anchor points
CLASSES = 3
NO_OBJECT = CLASSES  # the last logit


def build(dim: int = 128, heads: int = 4, enc_layers: int = 2, dec_layers: int = 2):
    import torch
    from torch import nn
    from torch.nn import functional as F

    neg = torch.finfo(torch.float32).min

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

        def forward(self, q, k, v, key_padding=None):  # [B, N, dim]; key_padding [B, Nk] bool (True = padding)
            b, nq, nk, hd = q.shape[0], q.shape[1], k.shape[1], dim // heads
            q = self.q(q).reshape(b, nq, heads, hd).transpose(1, 2)
            k = self.k(k).reshape(b, nk, heads, hd).transpose(1, 2)
            v = self.v(v).reshape(b, nk, heads, hd).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5)
            if key_padding is not None:
                scores = scores + torch.where(key_padding[:, None, None, :], neg, 0.0)
            attn = torch.softmax(scores, dim=-1)
            return self.out(torch.matmul(attn, v).transpose(1, 2).reshape(b, nq, dim))

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class EncoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.ffn = Attention(), FFN()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

        def forward(self, x, pos, key_padding):
            x = self.norm1(x + self.attn(x + pos, x + pos, x, key_padding))
            return self.norm2(x + self.ffn(x))

    class DecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.cross_attn, self.ffn = Attention(), Attention(), FFN()
            self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

        def forward(self, t, query_pos, memory, pos, key_padding):
            t = self.norm1(t + self.self_attn(t + query_pos, t + query_pos, t))
            t = self.norm2(t + self.cross_attn(t + query_pos, memory + pos, memory, key_padding))
            return self.norm3(t + self.ffn(t))

    def sine(y, x):  # positions [..., ] -> [..., dim]: DETR's sine embedding of (y, x)
        quarter = dim // 4
        freq = 10000 ** (torch.arange(quarter, dtype=torch.float32, device=y.device) / quarter)
        py, px = y[..., None] * (2 * math.pi / GRID) / freq, x[..., None] * (2 * math.pi / GRID) / freq
        return torch.cat([py.sin(), py.cos(), px.sin(), px.cos()], dim=-1)

    class MaskedDETR(nn.Module):
        def __init__(self):
            super().__init__()
            self.patchify = nn.Conv2d(3, 64, 4, stride=4)
            self.stem_norm = nn.LayerNorm(64)
            self.stem = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, dim, 2, stride=2))
            self.encoder = nn.ModuleList(EncoderLayer() for _ in range(enc_layers))
            self.decoder = nn.ModuleList(DecoderLayer() for _ in range(dec_layers))
            self.query = nn.Parameter(torch.zeros(1, GRID * GRID, dim))
            self.cls = nn.Linear(dim, CLASSES + 1)
            self.box = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
            ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
            anchors = torch.stack([xs, ys], -1).reshape(1, GRID * GRID, 2).float() + 0.5  # in cells
            self.register_buffer("anchors", anchors)
            self.register_buffer("query_pos", sine(anchors[..., 1], anchors[..., 0]))

        def forward(self, pixels, mask):  # raw 0-255 RGB [B, 3, 128, 128]; mask [B, 128, 128] bool, True = padding
            x = self.stem_norm(self.patchify(pixels).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            x = self.stem(x)  # [B, dim, 16, 16]
            pad = F.interpolate(mask[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0] > 0.5
            valid = (~pad).float()
            pos = sine(valid.cumsum(1) - 0.5, valid.cumsum(2) - 0.5).flatten(1, 2)  # Mask2Pos
            key_padding = pad.flatten(1)
            memory = x.flatten(2).transpose(1, 2)
            for layer in self.encoder:
                memory = layer(memory, pos, key_padding)
            t = self.query.expand(memory.shape[0], -1, -1)
            for layer in self.decoder:
                t = layer(t, self.query_pos, memory, pos, key_padding)
            reg = self.box(t)
            centre = (self.anchors + 2.0 * torch.tanh(reg[..., :2])) / GRID  # within two cells of its anchor
            size = torch.sigmoid(reg[..., 2:])
            return self.cls(t), torch.cat([centre, size], -1)

    return MaskedDETR()


def export(model, path, opset: int = 16) -> None:
    """Export as the seeds' users do: legacy exporter, opset 16 (LayerNorm decomposed), dynamic batch."""
    import torch

    model = model.eval().cpu()
    pixels = torch.rand(2, 3, CANVAS, CANVAS) * 255
    mask = torch.zeros(2, CANVAS, CANVAS, dtype=torch.bool)
    mask[1, :, 96:] = True
    torch.onnx.export(model, (pixels, mask), str(path), opset_version=opset, dynamo=False, input_names=["pixels", "mask"],
                      output_names=["logits", "boxes"],
                      dynamic_axes={"pixels": {0: "batch"}, "mask": {0: "batch"}, "logits": {0: "batch"}, "boxes": {0: "batch"}})


__all__ = ["CANVAS", "CLASSES", "GRID", "NO_OBJECT", "STRIDE", "build", "export"]
