"""``aligner demo``: the built-in example, start to finish, with no arguments.

The example detector (a small transformer detector that reads raw 0-255 pixels) and its shipped
synthetic val split: inspect → compare (FP16) → bisect → precision (COCO AP as the acceptance) →
eval → one HTML report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aligner.backends import reference_runner
from aligner.backends.target import REFERENCE, Target
from aligner.cli.common import OutputDir, check_writable
from aligner.cli.bisect import print_result as print_bisect
from aligner.cli.compare import print_result
from aligner.cli.eval import print_eval
from aligner.cli.precision import print_plan
from aligner.compare import compare
from aligner.errors import InputError
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import coco_acceptance, evaluate_detector
from aligner.examples import shapes_adapter, shapes_detector_path, shapes_preprocess, shapes_val
from aligner.graph.model import ModelGraph
from aligner.graph.risk import fp16_risks
from aligner.inputs import save_inputs, write_atomic
from aligner.report import write_report, write_run
from aligner.search import bisect
from aligner.search.precision import search_precision

MARKER = ".aligner-demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run aligner on the built-in example detector and dataset",
                       description="The built-in example end to end: a small transformer detector that reads raw 0-255 pixels, "
                                   "whose first LayerNorm overflows FP16. Inspect, compare FP32 with emulated FP16, bisect to the "
                                   "root cause, search the smallest FP32 plan that keeps COCO AP, evaluate, and write one HTML report.")
    p.epilog = """\
examples:
  aligner demo                                  # writes ./aligner-demo/ (report.html, plan.json, culprit/, ...)
  aligner demo --out /tmp/demo                  # another folder (one made by aligner demo is reused)
  aligner bisect aligner-demo/shapes_detector.onnx --inputs aligner-demo/inputs.npz --strategy isolate
  aligner doctor model.onnx --target ort:cuda:fp16 --inputs sample.npz   # the same pipeline on your model

Takes 25-60 s on a 2-core CPU, on the core install (no torch). exit status: 0 done, 2 a foreign --out"""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="aligner-demo", help="folder for the model, inputs and results (default ./aligner-demo)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable([OutputDir(out)], force=True)  # a file in the way is refused; a demo folder is checked below
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise InputError(f"{out} exists and was not made by aligner demo; choose another --out.")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    console = Console(highlight=False)
    model_path = out / "shapes_detector.onnx"
    shutil.copyfile(shapes_detector_path(), model_path)
    graph = ModelGraph.load(model_path)
    dataset = CocoDataset(*shapes_val())
    preprocess, adapter = shapes_preprocess(), shapes_adapter()
    images, _, _ = next(dataset.batches(preprocess, 50))
    feeds = {"pixels": images}
    save_inputs([feeds], out / "inputs.npz", force=True)

    console.rule("[bold]aligner demo")
    console.print(f"Model: {model_path} ({len(graph.nodes)} nodes, opset {graph.opset}), a transformer detector trained on "
                  f"synthetic shapes; input 'pixels' holds raw 0-255 values. Data: {len(dataset)} val images, "
                  f"{len(dataset.gt['annotations'])} objects.")
    risks = fp16_risks(graph)
    console.print(f"[bold]inspect[/]: {len(risks)} node(s) at static FP16 risk, e.g. {escape(risks[0].node)}: {escape(risks[0].reason)}"
                  if risks else "[bold]inspect[/]: no static FP16 risks")

    fp16 = Target.parse("emu:fp16")
    console.print("\n[bold]compare[/]: ORT CPU FP32 (reference) vs emu:fp16 (every stored tensor rounded to FP16), 50 images")
    result = compare(graph, target=fp16, feeds=feeds)
    print_result(result, top=6, console=console)

    console.print("\n[bold]bisect[/]: where it starts and why: the first divergent node, run alone on the reference's "
                  "inputs to tell its own error from inherited error, and a standalone repro")
    verdict = bisect(graph, target=fp16, feeds=feeds, strategy="all", save_repro=out / "culprit", force=True)
    print_bisect(verdict, console=console)

    console.print("\n[bold]precision[/]: the smallest set of nodes to keep in FP32 so that COCO AP on the val split stays within "
                  "0.5 AP point of FP32, every pin verified necessary")
    accept = coco_acceptance(dataset, adapter, preprocess, reference_runner(graph), max_drop=0.005)
    plan = search_precision(graph, target=fp16, samples=[feeds], accept=accept,
                            trials_log=_fresh(out / "plan.trials.jsonl"), save_model=out / "shapes_detector.mixed.onnx")
    print_plan(plan, console=console)
    evaluation = _evaluate(console, graph, dataset, plan, out)

    for name, doc in (("compare", result.to_dict()), ("bisect", verdict.to_dict()), ("eval", evaluation.to_dict())):
        write_atomic(out / f"{name}.json", json.dumps(doc, indent=1).encode())
    runs = [write_run(out / "runs" / "compare", "compare", graph, result.to_dict(), force=True),
            write_run(out / "runs" / "bisect", "bisect", graph, verdict.to_dict(), force=True),
            write_run(out / "runs" / "precision", "precision", graph, plan.to_dict(), out / "plan.trials.jsonl", force=True),
            write_run(out / "runs" / "eval", "eval", graph, evaluation.to_dict(), force=True)]
    report = write_report(runs, out / "report.html", force=True, title="aligner demo: shapes detector on raw pixels, FP16")
    _story(console, verdict, plan, evaluation)
    console.print(f"\n[bold]report[/]: {report} (one self-contained page: open it in any browser). "
                  f"Done in {time.perf_counter() - start:.1f} s.")
    console.print(f"Files in {out}/: report.html, runs/, shapes_detector.onnx, inputs.npz, compare.json, bisect.json, culprit/ "
                  "(standalone repro), plan.json, plan.trials.jsonl, shapes_detector.mixed.onnx, eval.json.")
    console.print(f"Try: aligner bisect {model_path} --inputs {out / 'inputs.npz'} --strategy isolate")
    return 0


def _evaluate(console: Console, graph: ModelGraph, dataset: CocoDataset, plan, out: Path):
    """COCO metrics of FP32, pure FP16 and (when one was found) the plan, written to plan.json first."""
    write_atomic(out / "plan.json", json.dumps(plan.to_dict(), indent=1).encode())
    console.print("\n[bold]eval[/]: COCO metrics of FP32, pure FP16 and the plan's mixed precision")
    targets = [REFERENCE, "emu:fp16"] + (["emu:fp16+plan"] if plan.passed and plan.pins else [])  # +plan: plan.json
    evaluation = evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(), targets, out / "plan.json", batch=50)
    print_eval(evaluation, console=console)
    return evaluation


def _story(console: Console, verdict, plan, evaluation) -> None:
    fp32, fp16 = evaluation["ort:cpu:fp32"].stats["AP"], evaluation["emu:fp16"].stats["AP"]
    cause = verdict.root_cause
    console.rule("[bold]what aligner found")
    if cause is not None:
        console.print(f"* The FP16 build first goes wrong at {escape(cause.node)} ({escape(cause.op_type)}, kind {cause.kind}): "
                      f"{escape(cause.reason)}.")
    console.print(f"* Pure FP16 costs {100 * (fp32 - fp16):.2f} AP points on the val split ({fp32:.4f} → {fp16:.4f}); no output is "
                  "NaN, so only a layer-wise compare or a task metric shows it.")
    if not any(t.target == "emu:fp16+plan" for t in evaluation.targets):
        console.print("* No precision plan was needed or found; see plan.json and plan.trials.jsonl.")
        return
    mixed = evaluation["emu:fp16+plan"].stats["AP"]
    console.print(f"* Keeping {len(plan.pins)} node(s) in FP32 ({escape(', '.join(plan.fp32_nodes))}; found in {plan.trials} trials, "
                  f"each pin proven necessary) gives AP {mixed:.4f}, {100 * (fp32 - mixed):+.2f} points from FP32, with "
                  f"{plan.fp16_flop_fraction:.0%} of the Conv/MatMul FLOPs still in FP16.")


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)  # the demo folder is aligner's own: start the log anew
    return path
