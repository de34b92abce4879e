"""Built-in examples: nothing is downloaded.

* ``tiny_vit``: a ViT on raw pixels with weights made in code (a decomposed LayerNorm overflows FP16);
* the shapes detector: a small transformer detector trained on the synthetic shapes dataset
  (``datasets/train_detector.py``), shipped as ONNX (1 MB), with the 200-image val split of
  ``datasets/shapes_val`` (regenerated from the deterministic generator when absent).
"""

from __future__ import annotations

import os
from pathlib import Path

from aligner.examples.tiny_vit import example_inputs, tiny_vit

_DATA = Path(__file__).resolve().parent / "data"
_REPO_SPLIT = Path(__file__).resolve().parents[2] / "datasets" / "shapes_val"


def shapes_detector_path() -> Path:
    """The example detector (ONNX opset 16; input ``pixels`` [batch, 3, 128, 128], raw 0-255)."""
    return _DATA / "shapes_detector.onnx"


def shapes_val() -> tuple[Path, Path]:
    """(images folder, instances JSON) of the shipped 200-image val split."""
    split = _REPO_SPLIT
    if not (split / "instances.json").exists():  # installed without the repository: regenerate once
        from aligner.examples.shapes import write_split

        split = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aligner" / "shapes_val"
        if not (split / "instances.json").exists():
            write_split(split, 200, seed=1)
    return split / "images", split / "instances.json"


def shapes_preprocess():
    """The detector reads the 128x128 image as raw 0-255 RGB, NCHW."""
    from aligner.eval.dataset import Preprocess

    return Preprocess(size=(128, 128), scale=1.0)


def shapes_adapter():
    """Its output rows are YOLO-style; per-class NMS at IoU 0.5."""
    from aligner.eval.adapters import yolo_adapter

    return yolo_adapter(output="detections", conf=0.01, iou=0.5)


__all__ = ["example_inputs", "shapes_adapter", "shapes_detector_path", "shapes_preprocess", "shapes_val", "tiny_vit"]
