"""The built-in example detector on the shipped synthetic val split: mAP, the FP16 loss, the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligner.backends import reference_runner
from aligner.backends.target import Target
from aligner.cli.main import main
from aligner.errors import InputError
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import coco_acceptance, evaluate_detector, label_map_for
from aligner.examples import shapes_adapter, shapes_detector_path, shapes_preprocess, shapes_val
from aligner.graph.model import ModelGraph
from aligner.search.precision import search_precision

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def test_committed_evaluation_meets_the_map_goal():
    doc = json.loads((DATASETS / "shapes_detector.eval.json").read_text())
    fp32 = doc["targets"]["ort:cpu:fp32"]
    assert fp32["AP"] >= 0.5 and fp32["images"] == 200
    assert doc["targets"]["emu:fp16"]["AP"] < fp32["AP"] - 0.005  # pure FP16 loses accuracy...
    assert doc["targets"]["emu:fp16+plan"]["AP"] >= fp32["AP"] - 0.005  # ...and the plan restores it


def test_subset_end_to_end_on_cpu():
    dataset = CocoDataset(*shapes_val(), limit=40)
    result = evaluate_detector(shapes_detector_path(), dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32"])
    assert result["ort:cpu:fp32"].stats["AP"] >= 0.5 and result["ort:cpu:fp32"].images == 40


def test_fp16_loses_map_and_the_searched_plan_restores_it(tmp_path):
    graph = ModelGraph.load(shapes_detector_path())
    dataset = CocoDataset(*shapes_val(), limit=100)
    accept = coco_acceptance(dataset, shapes_adapter(), shapes_preprocess(), reference_runner(graph), max_drop=0.005)
    x, _, _ = next(dataset.batches(shapes_preprocess(), 50))
    plan = search_precision(graph, "emu:fp16", samples=[{"pixels": x}], accept=accept)
    assert plan.passed and plan.fp32_nodes and all(n.startswith("/stem_norm/") for n in plan.fp32_nodes)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()))
    result = evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(),
                               ["ort:cpu:fp32", "emu:fp16", "emu:fp16+plan"], plan_file, batch=50)
    fp32, fp16, mixed = (result[t].stats["AP"] for t in ("ort:cpu:fp32", "emu:fp16", "emu:fp16+plan"))
    assert fp16 < fp32 - 0.005 and mixed >= fp32 - 0.005
    assert result["emu:fp16"].mvre["detections"] > 3 * result["emu:fp16+plan"].mvre["detections"]
    mixed_eval = result["emu:fp16+plan"]  # asked as emu:fp16+plan, recorded as the target it resolved to
    assert mixed_eval.spec == f"emu:fp16+{plan_file}" and mixed_eval.fp32_nodes == len(plan.fp32_nodes)
    # the same target as a value, the nodes in hand: the same numbers
    in_hand = Target.parse("emu:fp16", pins=plan.fp32_nodes)
    again = evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32", in_hand], batch=50)
    assert again[str(in_hand)].stats["AP"] == mixed
    with pytest.raises(InputError, match=r"plan is the plan file.*Target.parse\(spec, pins=nodes\)"):
        evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(), ["emu:fp16+plan"], plan.fp32_nodes)


def test_eval_cli_json_schema_and_bad_inputs(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "coco", "--limit", "20", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["reference"] == "ort:cpu:fp32"
    for t in doc["targets"].values():
        assert {"spec", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "mvre", "images", "nonfinite_images"} <= set(t)
    with_options = tmp_path / "options.json"  # a target's runtime options stay with it in the comma-separated list
    assert main(["eval", "coco", "--limit", "8", "--targets", "ort:cpu:fp32,emu:fp16@intra_op_num_threads=1,execution_mode=sequential",
                 "--json", str(with_options)]) == 0
    targets = json.loads(with_options.read_text())["targets"]
    assert targets["emu:fp16@intra_op_num_threads=1,execution_mode=sequential"]["spec"] == "emu:fp16@execution_mode=sequential,intra_op_num_threads=1"
    capsys.readouterr()
    images, ann = shapes_val()
    code = main(["eval", "coco", str(shapes_detector_path()), "--data", str(images), "--ann", str(ann), "--adapter", "detr", "--limit", "4"])
    assert code == 2 and "needs outputs ['logits', 'boxes']" in capsys.readouterr().err and True
    code = main(["eval", "coco", str(shapes_detector_path()), "--data", str(tmp_path), "--ann", str(ann), "--adapter", "yolo"])
    assert code == 2 and "are not in" in capsys.readouterr().err
    with pytest.raises(InputError, match="label map does not cover"):
        dataset = CocoDataset(images, ann, limit=10)
        evaluate_detector(shapes_detector_path(), dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32"],
                          label_map=label_map_for(dataset.gt, "identity"))


def test_topk_agreement_of_a_classifier_in_fp16(tmp_path, capsys):
    import torch

    from conftest import _export, build_cnn

    path = _export(build_cnn(), (torch.randn(1, 3, 32, 32),), tmp_path / "cnn.onnx", dynamo=False)
    images, _ = shapes_val()
    out = tmp_path / "topk.json"
    code = main(["eval", "topk", str(path), "--images", str(images), "--limit", "40", "--input-size", "32x32",
                 "--scale", "0.00392157", "--targets", "ort:cpu:fp32,emu:fp16", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    fp16 = doc["targets"]["emu:fp16"]
    assert doc["targets"]["ort:cpu:fp32"]["top1_agreement"] == 1.0 and doc["images"] == 40
    assert fp16["top1_agreement"] >= 0.9 and fp16["top5_agreement"] == 1.0 and 0 < fp16["mvre"] < 0.05
    code = main(["eval", "topk", str(path), "--images", str(tmp_path / "nothing")])
    assert code == 2 and "Image folder not found" in capsys.readouterr().err
