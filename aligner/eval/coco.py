"""COCO detection metrics through pycocotools (or faster-coco-eval, which gives the same numbers).

pycocotools prints; its output is captured and logged, never printed by the library.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aligner._optional import require
from aligner.errors import InputError

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
Backend = Literal["pycocotools", "faster-coco-eval"]


@dataclass(frozen=True)
class CocoStats:
    """The 12 ``COCOeval.stats`` by name (-1 where COCO defines none, e.g. no small objects)."""

    stats: tuple[float, ...]
    images: int
    detections: int
    backend: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __getitem__(self, name: str) -> float:
        return self.stats[STAT_NAMES.index(name)]

    def to_dict(self) -> dict:
        out = {name: value for name, value in zip(STAT_NAMES, self.stats)}
        out.update({"images": self.images, "detections": self.detections, "backend": self.backend, "notes": list(self.notes)})
        return out


def load_ground_truth(path: str | Path) -> dict:
    """Read a COCO instances JSON, with a clear error for what a user gets wrong."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Annotation file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); expected a COCO instances file (images, annotations, categories).") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in doc] if isinstance(doc, dict) else ["images", "annotations", "categories"]
    if missing:
        raise InputError(f"{path} is not a COCO instances file: missing {missing}.")
    return doc


def check_detections(detections: list[dict], gt: dict) -> None:
    """Category and image ids the ground truth does not know are an input error, named."""
    cats = {c["id"] for c in gt["categories"]}
    images = {i["id"] for i in gt["images"]}
    bad_cat = sorted({d["category_id"] for d in detections} - cats)
    if bad_cat:
        raise InputError(f"Detections use category id(s) {bad_cat[:10]} that the annotations do not define "
                         f"(known: {sorted(cats)[:20]}{'...' if len(cats) > 20 else ''}). Map the model's labels to COCO "
                         "category ids (e.g. contiguous 0..79 to COCO's 1..90) in the adapter.")
    bad_img = sorted({d["image_id"] for d in detections} - images)
    if bad_img:
        raise InputError(f"Detections refer to image id(s) {bad_img[:10]} that are not in the annotations.")


def evaluate_coco(gt: str | Path | dict, detections: list[dict] | str | Path, iou_type: str = "bbox",
                  backend: Backend = "pycocotools", image_ids: list[int] | None = None) -> CocoStats:
    """COCO metrics of ``detections`` (COCO results format) against ``gt`` (path or dict)."""
    gt_doc = gt if isinstance(gt, dict) else load_ground_truth(gt)
    if not isinstance(detections, list):
        try:
            detections = json.loads(Path(detections).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"Cannot read detections {detections}: {exc}") from None
    check_detections(detections, gt_doc)
    n_images = len(image_ids) if image_ids is not None else len(gt_doc["images"])
    if not detections:  # pycocotools cannot load an empty result list: every metric is 0
        notes = ("no detections: every metric is 0",)
        return CocoStats(tuple(0.0 for _ in STAT_NAMES), n_images, 0, backend, notes)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        if backend == "pycocotools":
            require("pycocotools", "COCO evaluation")
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        elif backend == "faster-coco-eval":
            require("faster_coco_eval", "the faster-coco-eval evaluator", package="faster-coco-eval")
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        else:
            raise InputError(f"Unknown COCO backend {backend!r}; choose pycocotools or faster-coco-eval.")
        coco_gt = COCO()
        coco_gt.dataset = gt_doc
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = Eval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("%s output:\n%s", backend, captured.getvalue())
    stats = tuple(float(x) for x in evaluator.stats[: len(STAT_NAMES)])
    return CocoStats(stats, n_images, len(detections), backend)


# ---- one evaluation in parts: per-image matching where the detections are, the summary once --------

def gt_index(gt: dict):
    """pycocotools' COCO index of a ground-truth dict (build once, pass to :func:`coco_image_evals`)."""
    require("pycocotools", "COCO evaluation")
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    return coco_gt


def coco_image_evals(gt: dict, detections: list[dict], image_ids: list[int], coco_gt=None) -> dict:
    """One part of a COCO evaluation (pycocotools, bbox): ``COCOeval.evaluate``'s per-image results
    for ``image_ids`` alone (``detections`` are theirs), keyed by (category id, area range index,
    image id). Each image's matching depends on its own ground truth and detections only, so
    :func:`coco_stats_of_parts` on the parts of all images gives :func:`evaluate_coco`'s numbers."""
    from pycocotools.cocoeval import COCOeval

    check_detections(detections, gt)
    coco_gt = coco_gt if coco_gt is not None else gt_index(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        else:  # pycocotools cannot load an empty result list: an index with no annotations
            from pycocotools.coco import COCO

            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]), "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
    p = evaluator.params
    keys = [(c, a, i) for c in p.catIds for a in range(len(p.areaRng)) for i in p.imgIds]
    return {k: None if e is None else {f: e[f] for f in _ACCUMULATED} for k, e in zip(keys, evaluator.evalImgs)}


_ACCUMULATED = ("dtScores", "dtMatches", "dtIgnore", "gtIgnore")  # what COCOeval.accumulate reads of each image's result


def coco_stats_of_parts(gt: dict, parts: list[dict], image_ids: list[int], detections: int, coco_gt=None) -> CocoStats:
    """:func:`evaluate_coco`'s result from the :func:`coco_image_evals` of every image (``detections``:
    how many there were in all): the per-image results in ``COCOeval.evaluate``'s order, then its
    accumulate and summarize."""
    if not detections:
        return CocoStats(tuple(0.0 for _ in STAT_NAMES), len(image_ids), 0, "pycocotools", ("no detections: every metric is 0",))
    import numpy as np
    from pycocotools.cocoeval import COCOeval

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        evaluator = COCOeval(coco_gt if coco_gt is not None else gt_index(gt), None, "bbox")
        p = evaluator.params
        p.imgIds = list(np.unique(list(image_ids)))  # as COCOeval.evaluate sets them
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        evaluator.evalImgs = [merged[(c, a, i)] for c in p.catIds for a in range(len(p.areaRng)) for i in p.imgIds]
        evaluator._paramsEval = copy.deepcopy(p)
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools output:\n%s", captured.getvalue())
    return CocoStats(tuple(float(x) for x in evaluator.stats[: len(STAT_NAMES)]), len(image_ids), detections, "pycocotools")


def stats_delta(target: CocoStats, reference: CocoStats) -> dict[str, float]:
    """Target minus reference per metric (NaN where either is -1, COCO's 'not defined')."""
    return {n: (t - r) if t >= 0 and r >= 0 else math.nan for n, t, r in zip(STAT_NAMES, target.stats, reference.stats)}


__all__ = ["STAT_NAMES", "CocoStats", "check_detections", "coco_image_evals", "coco_stats_of_parts", "evaluate_coco", "gt_index", "load_ground_truth", "stats_delta"]
