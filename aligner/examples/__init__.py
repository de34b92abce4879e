"""Built-in examples: nothing is downloaded.

* ``tiny_vit``: a ViT on raw pixels with weights made in code (a decomposed LayerNorm overflows FP16);
* the shapes detector: a small transformer detector trained on the synthetic shapes dataset
  (``datasets/train_detector.py``), shipped as ONNX (1 MB, package data), with its 200-image val
  split (seed 1, the images of ``datasets/shapes_val``), generated on first use into the user's
  cache by the deterministic generator (about 3 s).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from aligner.examples.tiny_vit import example_inputs, tiny_vit

VAL_COUNT, VAL_SEED = 200, 1


def shapes_detector_path() -> Path:
    """The example detector (ONNX opset 16; input ``pixels`` [batch, 3, 128, 128], raw 0-255)."""
    return Path(str(resources.files("aligner.examples") / "data" / "shapes_detector.onnx"))


def shapes_val() -> tuple[Path, Path]:
    """(images folder, instances JSON) of the 200-image val split, generated into the cache once
    (``$ALIGNER_CACHE``, else ``$XDG_CACHE_HOME/aligner``, else ``~/.cache/aligner``)."""
    split = cache_dir() / f"shapes_val-{VAL_COUNT}-seed{VAL_SEED}"
    if not (split / "instances.json").exists():
        from aligner.examples.shapes import write_split

        split.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".shapes_val-", dir=split.parent))
        try:
            write_split(partial, VAL_COUNT, seed=VAL_SEED)
            os.replace(partial, split)  # whole or nothing: a concurrent writer may have finished first
        except OSError:
            if not (split / "instances.json").exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return split / "images", split / "instances.json"


def cache_dir() -> Path:
    if os.environ.get("ALIGNER_CACHE"):
        return Path(os.environ["ALIGNER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligner"


def shapes_preprocess():
    """The detector reads the 128x128 image as raw 0-255 RGB, NCHW."""
    from aligner.eval.dataset import Preprocess

    return Preprocess(size=(128, 128), scale=1.0)


def shapes_adapter():
    """Its output rows are YOLO-style; per-class NMS at IoU 0.5."""
    from aligner.eval.adapters import yolo_adapter

    return yolo_adapter(output="detections", conf=0.01, iou=0.5)


__all__ = ["cache_dir", "example_inputs", "shapes_adapter", "shapes_detector_path", "shapes_preprocess", "shapes_val", "tiny_vit"]
