"""Export DETR-R50 (transformers, random weights, ResNet-50 backbone) at 800x800 for the benchmarks.

    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50.onnx
"""

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig


def main(out: str, size: int = 800) -> None:
    config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    torch.manual_seed(0)
    detr = DetrForObjectDetection(config).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.detr = detr

        def forward(self, pixel_values):
            o = self.detr(pixel_values=pixel_values)
            return o.logits, o.pred_boxes

    x = torch.randn(1, 3, size, size)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), (x,), out, opset_version=16, dynamo=False,
                          input_names=["pixel_values"], output_names=["logits", "boxes"])
    np.savez(Path(out).with_suffix(".inputs.npz"), pixel_values=np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/work/detr_r50.onnx")
