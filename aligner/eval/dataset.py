"""COCO-layout datasets (an image folder + an instances JSON) and model-input preprocessing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from aligner._optional import require
from aligner.errors import InputError
from aligner.eval.coco import load_ground_truth


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model input: resize (or letterbox, or pad) to ``size``, scale, normalize.

    ``pad`` keeps the image at its own size (scaled down only to fit) at the top-left of a zero
    canvas of ``size``: the padded batches of the DETR family, whose models also take a pixel mask
    (``mask_input``: the name of that bool input, True on padding; see :meth:`pixel_mask`)."""

    size: tuple[int, int]  # (height, width) of the model input
    resize: Literal["stretch", "letterbox", "pad"] = "stretch"
    scale: float = 1.0  # multiply pixels 0-255 by this (1/255 for 0-1 models; 1.0 for raw pixels)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    mask_input: str | None = None  # the model's pixel-mask input (bool [B, H, W], True on padding)

    def __call__(self, image) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """(input array, (scale_x, scale_y, pad_x, pad_y)) mapping model boxes back to the image."""
        from PIL import Image

        h, w = self.size
        if self.resize == "letterbox":
            r = min(h / image.height, w / image.width)
            nh, nw = round(image.height * r), round(image.width * r)
            canvas = Image.new("RGB", (w, h), (114, 114, 114))
            px, py = (w - nw) // 2, (h - nh) // 2
            canvas.paste(image.resize((nw, nh), Image.BILINEAR), (px, py))
            image, back = canvas, (1 / r, 1 / r, px, py)
        elif self.resize == "pad":
            r = min(1.0, h / image.height, w / image.width)
            nh, nw = round(image.height * r), round(image.width * r)
            canvas = Image.new("RGB", (w, h), (0, 0, 0))
            canvas.paste(image if r == 1.0 else image.resize((nw, nh), Image.BILINEAR), (0, 0))
            image, back = canvas, (1 / r, 1 / r, 0, 0)
        elif (image.height, image.width) != (h, w):
            back = (image.width / w, image.height / h, 0, 0)
            image = image.resize((w, h), Image.BILINEAR)
        else:
            back = (1.0, 1.0, 0, 0)
        x = np.asarray(image, np.float32) * self.scale
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return (x.transpose(2, 0, 1) if self.layout == "NCHW" else x), back

    def pixel_mask(self, width: int, height: int, back: tuple[float, float, float, float]) -> np.ndarray:
        """Bool [H, W] of the model input, True where an image of ``width`` x ``height`` placed by
        ``back`` (what ``__call__`` returned) left padding."""
        sx, sy, px, py = back
        h, w = self.size
        mask = np.ones((h, w), bool)
        x0, y0 = int(round(px)), int(round(py))
        mask[y0:y0 + round(height / sy), x0:x0 + round(width / sx)] = False
        return mask


@dataclass
class CocoDataset:
    """Images of a COCO instances file, read from ``images`` (the val2017 layout)."""

    images: Path
    annotations: Path
    limit: int | None = None

    def __post_init__(self):
        self.images, self.annotations = Path(self.images), Path(self.annotations)
        if not self.images.is_dir():
            raise InputError(f"Image folder not found: {self.images}")
        self.gt = load_ground_truth(self.annotations)
        entries = sorted(self.gt["images"], key=lambda i: i["id"])[: self.limit]
        missing = [e["file_name"] for e in entries if not (self.images / e["file_name"]).exists()]
        if missing:
            raise InputError(f"{len(missing)} image(s) listed in {self.annotations.name} are not in {self.images}, "
                             f"e.g. {missing[:3]}. Point --data at the folder holding them.")
        self.entries = entries

    @property
    def image_ids(self) -> list[int]:
        return [e["id"] for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def batches(self, preprocess: Preprocess, batch: int, only: range | None = None) -> Iterator[tuple[np.ndarray, list[dict], list[tuple]]]:
        """(inputs [B, ...], image entries, back-mapping per image), in image-id order; ``only``: the
        batches of these indices (a shard), else all."""
        require("PIL", "reading the dataset's images", package="pillow")
        from PIL import Image

        starts = range(0, len(self.entries), batch)
        for start in (starts if only is None else starts[only.start:only.stop]):
            chunk = self.entries[start:start + batch]
            arrays, backs = [], []
            for entry in chunk:
                with Image.open(self.images / entry["file_name"]) as im:
                    x, back = preprocess(im.convert("RGB"))
                arrays.append(x)
                backs.append(back)
            yield np.stack(arrays), chunk, backs


__all__ = ["CocoDataset", "Preprocess"]
