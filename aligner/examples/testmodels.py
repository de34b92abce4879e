"""PyTorch models with random weights that the tests and the benchmarks export and debug.

Built in code, nothing downloaded: a ResNet-style CNN, DETR (transformers), a one-stage detector
head and a deep tanh MLP, and the exporters' calls that turn them into ONNX. Needs torch (the
``torch`` extra; DETR also needs ``transformers``), imported when a function runs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from aligner._optional import require


def export_onnx(module, args, path: Path, dynamo: bool, **kw) -> Path:
    """Export ``module`` with the dynamo exporter (opset 18) or the legacy one (opset 16)."""
    torch = require("torch", "exporting the test models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), opset_version=18, dynamo=True, verbose=False, **kw)
        else:
            torch.onnx.export(module, args, str(path), opset_version=16, dynamo=False, **kw)
    return path


def build_cnn():
    """A small ResNet-style classifier with BatchNorm and one nearest-neighbour upsample (Resize),
    the CNN architecture of the tests."""
    torch = require("torch", "building the test CNN")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.layer1, self.layer2, self.layer3 = Block(16), Block(16), Block(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.layer1(self.stem(x))
            x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")  # an FPN-style Resize
            x = self.layer3(self.layer2(x))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = CNN().eval()
    with torch.no_grad():  # non-trivial running statistics, as in a trained network
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def build_detr(config=None):
    """DETR from transformers with random weights, returning (logits, boxes); small unless a
    ``DetrConfig`` is given (the benchmarks pass DETR-R50's)."""
    torch = require("torch", "building the test DETR")
    require("transformers", "building the test DETR")
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    if config is None:
        backbone = ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=16, layer_type="basic")
        config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=64,
                            encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=16,
                            encoder_attention_heads=4, decoder_attention_heads=4)
    torch.manual_seed(0)
    detr = DetrForObjectDetection(config).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.detr = detr

        def forward(self, pixel_values):
            out = self.detr(pixel_values=pixel_values)
            return out.logits, out.pred_boxes

    return Wrapped().eval()


def build_detector():
    """A one-stage detector head: conv backbone, per-location class scores and boxes, TopK of
    the best class score, boxes gathered by the chosen indices (scaled by a stride constant)."""
    torch = require("torch", "building the test detector")
    from torch import nn

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
            self.cls, self.box = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 4, 1)
            self.register_buffer("stride", torch.tensor(64.0))

        def forward(self, x):
            feat = self.backbone(x)
            scores = torch.sigmoid(self.cls(feat)).flatten(2).amax(dim=1)  # [B, HW]
            boxes = (torch.sigmoid(self.box(feat)).flatten(2).transpose(1, 2)) * self.stride  # [B, HW, 4]
            top, idx = torch.topk(scores, k=20, dim=1)
            return top, torch.gather(boxes, 1, idx.unsqueeze(-1).expand(-1, -1, 4))

    torch.manual_seed(0)
    return Detector().eval()


def build_deep_mlp(depth: int = 32, width: int = 64, gain: float = 3.0):
    """A deep tanh MLP in the chaotic regime (weight gain > 1): FP16 rounding error grows layer by
    layer with no single bad node, the honest "inherited" case."""
    torch = require("torch", "building the test MLP")
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        nn.init.normal_(linear.weight, std=gain / width**0.5)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers).eval()


def export_detr(kind: str, directory: Path) -> Path:
    """The small DETR exported by the ``legacy`` or the ``dynamo`` exporter as ``directory/detr_{kind}.onnx``."""
    torch = require("torch", "exporting the test DETR")
    kw = {"input_names": ["pixel_values"], "output_names": ["logits", "boxes"]} if kind == "legacy" else {}
    return export_onnx(build_detr(), (torch.randn(1, 3, 96, 96),), Path(directory) / f"detr_{kind}.onnx", kind == "dynamo", **kw)


def export_detr_with_mask(path: Path, config=None, height: int = 96, width: int = 128, pad: int = 32) -> tuple[Path, dict]:
    """DETR (random weights; small unless ``config``) with a padding mask as second input, exported by
    the legacy exporter at opset 16 (decomposed LayerNorms, additive-mask softmaxes); (path, feeds)."""
    torch = require("torch", "exporting the test DETR")
    detr = build_detr(config).detr

    class WithMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.detr = detr

        def forward(self, pixel_values, pixel_mask):
            out = self.detr(pixel_values=pixel_values, pixel_mask=pixel_mask)
            return out.logits, out.pred_boxes

    mask = torch.ones(1, height, width, dtype=torch.int64)
    mask[..., width - pad:] = 0  # padding on the right, as a batch of mixed aspect ratios has
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithMask(), (torch.randn(1, 3, height, width), mask), str(path), opset_version=16, dynamo=False,
                          input_names=["pixel_values", "pixel_mask"], output_names=["logits", "boxes"])
    feeds = {"pixel_values": np.random.default_rng(0).normal(size=(1, 3, height, width)).astype(np.float32), "pixel_mask": mask.numpy()}
    return path, feeds


__all__ = ["build_cnn", "build_deep_mlp", "build_detector", "build_detr", "export_detr", "export_detr_with_mask", "export_onnx"]
