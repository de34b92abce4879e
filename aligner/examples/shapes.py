"""Synthetic shapes in COCO format: squares, discs and triangles on textured backgrounds.

Deterministic: the same seed and index always give the same image and boxes, so anyone can
regenerate the shipped split, and training draws fresh images from the same generator.

    python datasets/make_shapes.py datasets/shapes_val --count 200 --seed 1   # the shipped val split
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aligner._optional import require

SIZE = 128
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "triangle"}]


def render(index: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Image ``index`` of split ``seed``: uint8 [SIZE, SIZE, 3] and its objects (COCO bbox, category)."""
    require("PIL", "drawing the synthetic shapes", package="pillow")
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    base = rng.integers(30, 225, size=3)
    ramp = np.linspace(-25, 25, SIZE)[:, None, None] * rng.uniform(-1, 1, size=3)
    noise = rng.normal(0, 8, size=(SIZE, SIZE, 3))
    canvas = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    objects, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            s = int(rng.integers(14, 44))
            x, y = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
            if all(_iou((x, y, s, s), b) < 0.1 for b in boxes):
                break
        else:
            continue
        cat = int(rng.integers(1, 4))
        color = tuple(int(c) for c in (base + rng.choice([-1, 1], size=3) * rng.integers(70, 120, size=3)) % 256)
        if cat == 1:
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=color)
        elif cat == 2:
            draw.ellipse([x, y, x + s - 1, y + s - 1], fill=color)
        else:
            draw.polygon([(x + s / 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)], fill=color)
        boxes.append((x, y, s, s))
        objects.append({"bbox": [float(x), float(y), float(s), float(s)], "category_id": cat})
    return np.asarray(image), objects


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def write_split(out: Path, count: int, seed: int) -> Path:
    """Images under ``out/images`` and ``out/instances.json`` (the val2017 layout)."""
    require("PIL", "writing the synthetic shapes", package="pillow")
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, objects = render(i, seed)
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(out / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": obj["category_id"],
                                "bbox": obj["bbox"], "area": obj["bbox"][2] * obj["bbox"][3], "iscrowd": 0})
    doc = {"info": {"description": f"aligner synthetic shapes, seed {seed}, {count} images"}, "images": images,
           "annotations": annotations, "categories": CATEGORIES}
    (out / "instances.json").write_text(json.dumps(doc))
    return out


__all__ = ["CATEGORIES", "SIZE", "render", "write_split"]
