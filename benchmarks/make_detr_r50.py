"""Export DETR-R50 (transformers, random weights, ResNet-50 backbone) at 800x800 for the benchmarks.

    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50.onnx          # 800x800
    python benchmarks/make_detr_r50.py benchmarks/work/detr_r50_512.onnx 512  # 512x512
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DetrConfig, ResNetConfig

from _work import WORK

from aligner.examples.testmodels import build_detr, export_onnx  # the tests' DETR builder and exporter


def main(out: str, size: int = 800) -> None:
    config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    export_onnx(build_detr(config), (torch.randn(1, 3, size, size),), Path(out), dynamo=False,
            input_names=["pixel_values"], output_names=["logits", "boxes"])
    np.savez(Path(out).with_suffix(".inputs.npz"), pixel_values=np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(WORK / "detr_r50.onnx"), int(sys.argv[2]) if len(sys.argv) > 2 else 800)
