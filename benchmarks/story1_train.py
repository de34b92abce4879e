"""Story 1's data and training (``benchmarks/story1.py``): padded val/train sets of the shipped
shapes with per-image sizes, and the masked DETR trained with a fixed seed (or weights loaded back)."""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.examples.masked_detr import CANVAS, GRID, NO_OBJECT  # noqa: E402
from aligner.examples.shapes import CATEGORIES, render  # noqa: E402

SIZE_SEED = 7  # the stream of per-image sizes (never the image seeds)


# ---- data -------------------------------------------------------------------------------------

def sized(index: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Image ``index`` of shapes split ``seed`` resized to its own (height, width) in 64..128."""
    from PIL import Image

    pixels, objects = render(index, seed)
    rng = np.random.default_rng([seed, index, SIZE_SEED])
    h, w = (int(v) for v in rng.integers(64, CANVAS + 1, size=2))
    image = np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))
    sx, sy = w / CANVAS, h / CANVAS
    out = [{"bbox": [o["bbox"][0] * sx, o["bbox"][1] * sy, o["bbox"][2] * sx, o["bbox"][3] * sy], "category_id": o["category_id"]}
           for o in objects]
    return image, out


def _padded_chunk(args):
    start, count, seed = args
    images = np.zeros((count, CANVAS, CANVAS, 3), np.uint8)
    masks = np.ones((count, CANVAS, CANVAS), bool)
    targets = []
    for k in range(count):
        image, objects = sized(start + k, seed)
        images[k, : image.shape[0], : image.shape[1]] = image
        masks[k, : image.shape[0], : image.shape[1]] = False
        targets.append(objects)
    return images, masks, targets


def padded_set(count: int, seed: int, workers: int):
    chunk = math.ceil(count / workers)
    jobs = [(s, min(chunk, count - s), seed) for s in range(0, count, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_padded_chunk, jobs))
    else:
        parts = [_padded_chunk(j) for j in jobs]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), [t for p in parts for t in p[2]])


def encode(targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class per query [N, 256] (NO_OBJECT where free), box per query [N, 256, 4] (cx, cy, w, h / 128),
    positive mask: each object goes to the free query nearest its centre (anchors on the 16x16 grid)."""
    n = len(targets)
    cls = np.full((n, GRID * GRID), NO_OBJECT, np.int64)
    box = np.zeros((n, GRID * GRID, 4), np.float32)
    ay, ax = np.divmod(np.arange(GRID * GRID), GRID)
    for k, objects in enumerate(targets):
        taken = np.zeros(GRID * GRID, bool)
        for obj in sorted(objects, key=lambda o: -o["bbox"][2] * o["bbox"][3]):
            x, y, w, h = obj["bbox"]
            cx, cy = (x + w / 2) / CANVAS * GRID, (y + h / 2) / CANVAS * GRID
            dist = (ax + 0.5 - cx) ** 2 + (ay + 0.5 - cy) ** 2 + taken * 1e9
            q = int(np.argmin(dist))
            taken[q] = True
            cls[k, q] = obj["category_id"] - 1
            box[k, q] = [(x + w / 2) / CANVAS, (y + h / 2) / CANVAS, w / CANVAS, h / CANVAS]
    return cls, box, cls != NO_OBJECT


def write_val(folder: Path, count: int) -> tuple[Path, Path]:
    """The multi-size val split in the val2017 layout: JPEG images of their own sizes + instances.json."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, objects = sized(i, 1)
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(folder / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        for o in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": o["category_id"],
                                "bbox": [round(v, 3) for v in o["bbox"]], "area": o["bbox"][2] * o["bbox"][3], "iscrowd": 0})
    doc = {"info": {"description": f"shapes val (seed 1), {count} images resized to 64-128 px a side (size seed {SIZE_SEED})"},
           "images": images, "annotations": annotations, "categories": CATEGORIES}
    (folder / "instances.json").write_text(json.dumps(doc))
    return folder / "images", folder / "instances.json"


# ---- training ---------------------------------------------------------------------------------

def train(args, out: Path) -> dict:
    import torch
    from torch.nn import functional as F

    from aligner.examples.masked_detr import build, export

    torch.manual_seed(0)
    dev = "cuda" if args.device == "cuda" else "cpu"
    start = time.time()
    images, masks, targets = padded_set(args.train_images, seed=0, workers=args.workers)
    cls, box, pos = encode(targets)
    print(f"data: {len(images)} padded images in {time.time() - start:.1f} s", flush=True)
    x_all = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2)  # uint8 on the device; float per batch
    m_all, c_all, b_all, p_all = (torch.from_numpy(a).to(dev) for a in (masks, cls, box, pos))
    model = build().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    weight = torch.tensor([1.0] * NO_OBJECT + [0.1], device=dev)  # DETR's no-object weight
    log, t0, step = [], time.time(), 0
    for step in range(args.steps):
        progress = max(step / args.steps, (time.time() - t0) / args.train_seconds)
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (args.batch,), device=dev)
        logits, pred = model(x_all[idx].float(), m_all[idx])
        ce = F.cross_entropy(logits.reshape(-1, NO_OBJECT + 1), c_all[idx].reshape(-1), weight=weight)
        p = p_all[idx].float()
        l1 = ((pred - b_all[idx]).abs().sum(-1) * p).sum() / p.sum().clamp(min=1)
        loss = ce + 5.0 * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "ce": ce.item(), "l1": l1.item(), "lr": lr,
                        "seconds": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
    seconds = time.time() - t0
    model = model.eval().cpu()
    torch.save(model.state_dict(), out / "masked_detr.pt")
    export(model, out / "masked_detr.onnx")
    doc = {"device": dev, "steps_done": step + 1, "steps_asked": args.steps, "train_seconds_cap": args.train_seconds,
           "train_seconds": round(seconds, 1), "batch": args.batch, "lr": args.lr, "train_images": args.train_images,
           "seed": 0, "torch": torch.__version__, "log": log}
    (out / "train_log.json").write_text(json.dumps(doc, indent=1))
    return doc


def load_weights(path: Path, out: Path) -> dict:
    import torch

    from aligner.examples.masked_detr import build, export

    model = build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    export(model.eval(), out / "masked_detr.onnx")
    return {"weights": str(path), "trained": False}
