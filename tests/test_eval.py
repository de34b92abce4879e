"""COCO evaluation against published known answers; adapters; MVRE; bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from aligner.errors import InputError
from aligner.eval import detr_adapter, evaluate_coco, load_ground_truth, output_mvre, yolo_adapter


def _known_answers() -> Path | None:
    here = Path(__file__).resolve()
    for base in (os.environ.get("ALIGNER_SHARED"), here.parents[2] / "shared", Path("/work/shared")):
        if base and (Path(base) / "data" / "cocoeval" / "README.md").exists():
            return Path(base) / "data" / "cocoeval"
    return None


DATA = _known_answers()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data/cocoeval (known answers) not found; set ALIGNER_SHARED")
BACKENDS = ["pycocotools", pytest.param("faster-coco-eval", marks=pytest.mark.skipif(
    importlib.util.find_spec("faster_coco_eval") is None, reason="faster-coco-eval (optional) not installed"))]

# The published COCOeval.stats of ../shared/data/cocoeval/README.md.
BBOX_100 = (0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443, 0.5193996948036719,
            0.5013978986347466, 0.38681277964578054, 0.5936795762842003, 0.595352982877607, 0.6398109626113442,
            0.5664205978994309, 0.5642905982905982)
SEGM_100 = (.320, .562, .299, .387, .310, .327, .268, .415, .417, .469, .377, .381)
SMALL = (0.6947194719471946, 0.6947194719471946, 0.6947194719471946, -1, 0.7920792079207921, 0.0, 0.6666666666666666,
         0.75, 0.75, -1, 0.7916666666666666, 0.0)


@needs_data
@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answers_are_reproduced(backend):
    bbox = evaluate_coco(DATA / "instances_val2014_100.json", DATA / "instances_val2014_fakebbox100_results.json", "bbox", backend)
    assert np.allclose(bbox.stats, BBOX_100, rtol=0, atol=1e-12)
    assert bbox["AP"] == pytest.approx(0.5045806987249628, abs=1e-12) and bbox.images == 100
    segm = evaluate_coco(DATA / "instances_val2014_100.json", DATA / "instances_val2014_fakesegm100_results.json", "segm", backend)
    assert np.allclose(np.round(segm.stats, 3), SEGM_100, atol=1e-9)
    small = evaluate_coco(DATA / "gt_dataset.json", DATA / "dt_dataset.json", "bbox", backend)
    assert np.allclose(small.stats, SMALL, rtol=0, atol=1e-12)


@needs_data
def test_detr_adapter_turns_perfect_outputs_into_ap_1():
    gt = load_ground_truth(DATA / "gt_dataset.json")
    cats = sorted(c["id"] for c in gt["categories"])
    detections = []
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        w, h = image["width"], image["height"]
        logits = np.full((1, 10, len(cats) + 1), -10.0, np.float32)
        logits[0, :, -1] = 10.0  # unused queries say "no object"
        boxes = np.full((1, 10, 4), 0.5, np.float32)
        for q, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            logits[0, q, cats.index(a["category_id"])], logits[0, q, -1] = 10.0, -10.0
            boxes[0, q] = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
        (dets,) = detr_adapter(top_k=len(anns))({"logits": logits, "boxes": boxes}, [(h, w)])
        detections += dets.to_coco(image["id"], label_map=dict(enumerate(cats)))
    assert evaluate_coco(gt, detections)["AP"] == pytest.approx(1.0)


def test_yolo_adapter_suppresses_duplicates():
    rows = np.zeros((1, 3, 6), np.float32)  # two overlapping boxes of one object and one far away
    rows[0, 0] = [50, 50, 20, 20, 0.9, 1.0]
    rows[0, 1] = [51, 50, 20, 20, 0.8, 1.0]
    rows[0, 2] = [10, 10, 8, 8, 0.7, 1.0]
    (dets,) = yolo_adapter()({"output": rows}, [(100, 100)])
    assert len(dets.scores) == 2 and np.allclose(dets.boxes[0], [40, 40, 20, 20])


def test_mvre_follows_the_seed_definition_and_skips_nonfinite():
    r = np.array([1.0, 2.0, 0.0, np.inf])
    t = np.array([1.1, 1.8, 1e-7, 5.0])
    expected = np.mean([0.1 / 1.0, 0.2 / 2.0, 1e-7 / 1e-6])  # |r| below eps counts as eps; inf skipped
    assert output_mvre(r, t) == pytest.approx(expected)


@needs_data
def test_bad_inputs_get_clear_messages(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_ground_truth(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_ground_truth(tmp_path / "broken.json")
    gt = load_ground_truth(DATA / "gt_dataset.json")
    with pytest.raises(InputError, match=r"category id\(s\) \[99\]"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "score": 0.5}])
    empty = evaluate_coco(gt, [])
    assert empty["AP"] == 0 and "no detections" in empty.notes[0]
    with pytest.raises(InputError, match=r"needs outputs \['logits', 'boxes'\].*pred_logits"):
        detr_adapter()({"pred_logits": np.zeros((1, 2, 3))}, [(10, 10)])
    (tmp_path / "dets.json").write_text(json.dumps([]))
    assert evaluate_coco(gt, tmp_path / "dets.json").detections == 0
