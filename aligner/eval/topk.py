"""Classifier agreement across targets: top-1 / top-5 agreement with the reference, MVRE of logits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner._optional import require
from aligner.errors import InputError
from aligner.eval.dataset import Preprocess
from aligner.eval.run import model_batch, runner_for
from aligner.graph.model import ModelGraph

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class TopkEval:
    target: str
    top1_agreement: float  # share of images whose top-1 class equals the reference's
    top5_agreement: float  # share of images whose reference top-1 is in the target's top-5
    mvre: float  # of the logits vs the reference
    images: int
    nonfinite_images: int
    seconds: float

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["mvre"] = self.mvre if math.isfinite(self.mvre) else None
        return d


def image_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    return files


def evaluate_topk(model: ModelGraph | str | Path, images: Sequence[Path] | np.ndarray, preprocess: Preprocess | None,
                  targets: Iterable[str] = ("ort:cpu:fp32", "emu:fp16"), plan: str | Path | None = None, batch: int = 32,
                  output: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> list[TopkEval]:
    """Agreement of each target's predictions with the first target's, image by image. ``images`` are
    image files (read with ``preprocess``) or one array of preprocessed images, N first."""
    given = isinstance(images, np.ndarray)
    if not given:
        require("PIL", "reading images", package="pillow")
        from PIL import Image

    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    targets = list(targets)
    if len(graph.input_names) != 1:
        raise InputError(f"aligner eval topk feeds one image tensor; this model has inputs {graph.input_names}.")
    name = output or graph.output_names[0]
    if name not in graph.output_names:
        raise InputError(f"No output {name!r}; the model's outputs are {graph.output_names}.")
    runners = [runner_for(graph, t, plan)[0] for t in targets]
    batch = model_batch(graph, batch)
    agree1, agree5, nonfinite = ([0] * len(targets) for _ in range(3))
    err, count, seconds = [0.0] * len(targets), [0] * len(targets), [0.0] * len(targets)
    for start in range(0, len(images), batch):
        arrays = []
        for path in [] if given else images[start:start + batch]:
            with Image.open(path) as im:
                arrays.append(preprocess(im.convert("RGB"))[0])
        x = images[start:start + batch] if given else np.stack(arrays)
        ref_logits = None
        for i, runner in enumerate(runners):
            t0 = time.perf_counter()
            logits = np.asarray(runner.run({graph.input_names[0]: x})[name], np.float64).reshape(len(x), -1)
            seconds[i] += time.perf_counter() - t0
            ref_logits = logits if ref_logits is None else ref_logits
            ref_top1 = ref_logits.argmax(-1)
            safe = np.where(np.isfinite(logits), logits, -np.inf)
            agree1[i] += int((safe.argmax(-1) == ref_top1).sum())
            top5 = np.argsort(-safe, axis=-1)[:, :5]
            agree5[i] += int((top5 == ref_top1[:, None]).any(-1).sum())
            nonfinite[i] += int((~np.isfinite(logits)).any(-1).sum())
            ok = np.isfinite(logits) & np.isfinite(ref_logits)
            err[i] += float(np.sum(np.abs(logits[ok] - ref_logits[ok]) / np.maximum(np.abs(ref_logits[ok]), 1e-6)))
            count[i] += int(ok.sum())
        if progress:
            progress("images", min(start + batch, len(images)), len(images))
    n = len(images)
    return [TopkEval(t, agree1[i] / n, agree5[i] / n, err[i] / count[i] if count[i] else math.nan, n, nonfinite[i], seconds[i])
            for i, t in enumerate(targets)]


__all__ = ["TopkEval", "evaluate_topk", "image_files"]
