"""The committed evaluation of the example detector: FP32, pure FP16 (emulated) and the plan.

    python datasets/evaluate_detector.py

Searches the precision plan with a task-metric acceptance (COCO AP at most 0.5 AP point below
FP32 on the shipped val split), then evaluates ort:cpu:fp32, emu:fp16 and emu:fp16+plan, and
writes ``datasets/shapes_detector.plan.json`` and ``datasets/shapes_detector.eval.json``.
"""

import json
from pathlib import Path

from aligner.backends import reference_runner
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import coco_acceptance, evaluate_detector
from aligner.examples import shapes_adapter, shapes_detector_path, shapes_preprocess, shapes_val
from aligner.graph.model import ModelGraph
from aligner.search.precision import search_precision

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    graph = ModelGraph.load(shapes_detector_path())
    dataset = CocoDataset(*shapes_val())
    accept = coco_acceptance(dataset, shapes_adapter(), shapes_preprocess(), reference_runner(graph), max_drop=0.005)
    x, _, _ = next(dataset.batches(shapes_preprocess(), 50))
    plan = search_precision(graph, "emu:fp16", samples=[{"pixels": x}], accept=accept)
    plan_doc = plan.to_dict()
    plan_doc["model"] = "aligner/examples/data/shapes_detector.onnx"
    (HERE / "shapes_detector.plan.json").write_text(json.dumps(plan_doc, indent=1))
    result = evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(),
                               ["ort:cpu:fp32", "emu:fp16", "emu:fp16+plan"], HERE / "shapes_detector.plan.json", batch=50)
    doc = result.to_dict()
    doc["model"], doc["dataset"] = "aligner/examples/data/shapes_detector.onnx", "datasets/shapes_val/instances.json"
    (HERE / "shapes_detector.eval.json").write_text(json.dumps(doc, indent=1))
    for t in result.targets:
        print(f"{t.target:16s} AP {t.stats['AP']:.4f}  AP50 {t.stats['AP50']:.4f}  FP32 nodes {t.fp32_nodes}")
    print("plan:", plan.fp32_nodes, f"({plan.trials} trials)")
