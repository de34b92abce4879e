"""Train the example detector on synthetic shapes and export it (run on the GPU machine).

    python datasets/train_detector.py --out $OUT --steps 4000

Training images come from ``datasets/shapes.py`` with seed 0 (the shipped val split is seed 1).
Loss: CenterNet-style focal loss on the per-cell class scores (Gaussian targets around each
object's centre cell) plus L1 on the centre offset and log size at the centre cell. Writes
``shapes_detector.onnx`` (opset 16, legacy exporter: LayerNorm decomposed) and ``train_log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aligner.examples.shapes_detector import CLASSES, SIZE, STRIDE, build  # noqa: E402
from aligner.examples.shapes import render  # noqa: E402

GRID = SIZE // STRIDE


def _make(args):
    start, count, seed = args
    images, targets = [], []
    for i in range(start, start + count):
        pixels, objects = render(i, seed)
        images.append(pixels)
        targets.append(objects)
    return np.stack(images), targets


def dataset(count: int, seed: int, workers: int = 16):
    chunk = math.ceil(count / workers)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_make, [(s, min(chunk, count - s), seed) for s in range(0, count, chunk)]))
    return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]


def encode(targets):
    """Heatmap [N, GRID*GRID, C], regression [N, GRID*GRID, 4] and its mask at centre cells."""
    n = len(targets)
    heat = np.zeros((n, GRID, GRID, CLASSES), np.float32)
    reg = np.zeros((n, GRID, GRID, 4), np.float32)
    mask = np.zeros((n, GRID, GRID), np.float32)
    ys, xs = np.mgrid[0:GRID, 0:GRID]
    for k, objects in enumerate(targets):
        for obj in objects:
            x, y, w, h = obj["bbox"]
            cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
            gx, gy = min(int(cx), GRID - 1), min(int(cy), GRID - 1)
            sigma = max(w, h) / STRIDE / 6 + 0.3
            g = np.exp(-((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2) / (2 * sigma**2))
            c = obj["category_id"] - 1
            heat[k, :, :, c] = np.maximum(heat[k, :, :, c], g)
            heat[k, gy, gx, c] = 1.0
            reg[k, gy, gx] = [cx - gx, cy - gy, math.log(w / STRIDE), math.log(h / STRIDE)]
            mask[k, gy, gx] = 1.0
    return heat.reshape(n, -1, CLASSES), reg.reshape(n, -1, 4), mask.reshape(n, -1)


def focal(logits, heat):
    p = torch.sigmoid(logits).clamp(1e-6, 1 - 1e-6)
    pos = heat.eq(1).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.time()
    images, targets = dataset(args.train_images, seed=0)
    heat, reg, mask = encode(targets)
    print(f"data: {len(images)} images in {time.time() - start:.1f} s", flush=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x_all = torch.from_numpy(images).to(dev).permute(0, 3, 1, 2).float()  # raw 0-255, as deployed
    heat_t, reg_t, mask_t = (torch.from_numpy(a).to(dev) for a in (heat, reg, mask))
    model = build().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.05)
    log = []
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (args.batch,), device=dev)
        x, h, r, m = x_all[idx], heat_t[idx], reg_t[idx], mask_t[idx]
        if step % 2:  # horizontal flip: mirror pixels and targets
            x = x.flip(-1)
            h = h.view(-1, GRID, GRID, CLASSES).flip(2).reshape(h.shape)
            r = r.view(-1, GRID, GRID, 4).flip(2).reshape(r.shape).clone()
            m = m.view(-1, GRID, GRID).flip(2).reshape(m.shape)
            r[..., 0] = torch.where(m > 0, 1 - r[..., 0], r[..., 0])
        logits, pred = model.raw(x)
        l_heat = focal(logits, h)
        off = torch.sigmoid(pred[..., :2])
        l_box = ((torch.abs(off - r[..., :2]).sum(-1) + torch.abs(pred[..., 2:] - r[..., 2:]).sum(-1)) * m).sum() / m.sum().clamp(min=1)
        loss = l_heat + 2.0 * l_box
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": float(loss), "heat": float(l_heat), "box": float(l_box)})
            print(log[-1], f"{time.time() - start:.0f} s", flush=True)
    model = model.eval().cpu()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE) * 255,), str(args.out / "shapes_detector.onnx"), opset_version=16,
                      dynamo=False, input_names=["pixels"], output_names=["detections"],
                      dynamic_axes={"pixels": {0: "batch"}, "detections": {0: "batch"}})
    (args.out / "train_log.json").write_text(json.dumps({"steps": args.steps, "train_images": args.train_images,
                                                         "seconds": time.time() - start, "log": log}, indent=1))
    print("exported", args.out / "shapes_detector.onnx", flush=True)


if __name__ == "__main__":
    main()
