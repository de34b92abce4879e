"""``aligner demo``: the built-in example, start to finish, with no arguments.

``aligner doctor`` on the example detector (a small transformer detector that reads raw 0-255
pixels) with its shipped synthetic val split as the task metric: inspect → compare (FP16) →
bisect → precision (COCO AP as the acceptance) → build → eval → one HTML report, each step's
result printed in full as it finishes.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aligner.cli.bisect import print_result as print_bisect
from aligner.cli.common import OutputDir, check_writable
from aligner.cli.compare import print_result
from aligner.cli.eval import print_eval
from aligner.cli.precision import print_plan
from aligner.doctor import Step, doctor
from aligner.doctor.task import example_coco
from aligner.errors import InputError
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph

MARKER = ".aligner-demo"
MAX_DROP = 0.005  # the plan's acceptance: COCO AP at most half a point below FP32
BATCH = 50  # images per run; the first batch is what compare, bisect and build run


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run aligner on the built-in example detector and dataset",
                       description="The built-in example end to end: a small transformer detector that reads raw 0-255 pixels, "
                                   "whose first LayerNorm overflows FP16. aligner doctor on it, with its val split as the task "
                                   "metric: inspect, compare FP32 with emulated FP16, bisect to the root cause, search the smallest "
                                   "FP32 plan that keeps COCO AP, build and check the model, evaluate, and write one HTML report.")
    p.epilog = """\
examples:
  aligner demo                                  # writes ./aligner-demo/ (report.html, plan.json, culprit/, ...)
  aligner demo --out /tmp/demo                  # another folder (one made by aligner demo is reused)
  aligner demo --bench-runs 10                  # also time FP32, FP16 and the plan on ONNX Runtime CPU
  aligner bisect aligner-demo/shapes_detector.onnx --inputs aligner-demo/inputs.npz --strategy isolate
  aligner doctor aligner-demo/shapes_detector.onnx --example-data --batch 50 --strategy all --bench-runs 0 \\
      --out again                               # the same pipeline, by hand (aligner demo is this)
  aligner doctor model.onnx --target ort:cuda:fp16 --inputs sample.npz   # the same pipeline on your model

Uses about 50 CPU-seconds on the core install (no torch): 24-40 s on a quiet 2-core CPU, minutes
when other work shares the cores (benchmarks/demo_time.py measures it).
exit status: 0 done, 2 a foreign --out"""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="aligner-demo", help="folder for the model, inputs and results (default ./aligner-demo)")
    p.add_argument("--bench-runs", type=int, default=0, metavar="N",
                   help="time each precision N times on ONNX Runtime CPU (default 0: no bench step, as the demo's speed on "
                        "50-image batches takes longer than the rest)")


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
    task = example_coco(MAX_DROP, BATCH)

    console.rule("[bold]aligner demo")
    console.print(f"Model: {model_path} ({len(graph.nodes)} nodes, opset {graph.opset}), a transformer detector trained on "
                  f"synthetic shapes; input 'pixels' holds raw 0-255 values. Data: {len(task.dataset)} val images, "
                  f"{len(task.dataset.gt['annotations'])} objects. Running aligner doctor on it, target emu:fp16.")
    shown = _Sections(console)
    result = doctor(graph, "emu:fp16", out, task=task, strategy="all", bench_runs=max(args.bench_runs, 0), on_step=shown)
    _story(console, shown.values.get("bisect"), shown.values.get("precision"), shown.values.get("eval"))
    console.print(f"\n[bold]report[/]: {result.report} (one self-contained page: open it in any browser). "
                  f"Done in {time.perf_counter() - start:.1f} s.")
    console.print(f"Files in {out}/: report.html, doctor.json (every step's summary and the command that re-runs it alone), runs/, "
                  "shapes_detector.onnx, inputs.npz, inspect.json, compare.json, culprit/ (standalone repro), plan.json, "
                  "plan.trials.jsonl, model.fp16.mixed.onnx, model.fp16.onnx (the built model) and its .json, eval.json.")
    console.print(f"Try: aligner bisect {model_path} --inputs {out / 'inputs.npz'} --strategy isolate")
    return 0


class _Sections:
    """Prints each step's result in full as doctor finishes it (on_step), and keeps the values."""

    HEADS = {
        "compare": "ORT CPU FP32 (reference) vs emu:fp16 (every stored tensor rounded to FP16), first {batch} images",
        "bisect": "where it starts and why: the first divergent node, run alone on the reference's inputs to tell its own "
                  "error from inherited error, and a standalone repro",
        "precision": "the smallest set of nodes to keep in FP32 so that COCO AP on the val split stays within "
                     "{points:g} AP point of FP32, every pin verified necessary",
        "eval": "COCO metrics of FP32, pure FP16 and the plan's mixed precision",
    }

    def __init__(self, console: Console):
        self.console, self.values = console, {}

    def __call__(self, step: Step, value) -> None:
        console, name = self.console, step.name
        self.values[name] = value
        if name in self.HEADS:
            console.print(f"\n[bold]{name}[/]: " + self.HEADS[name].format(batch=BATCH, points=100 * MAX_DROP))
        if name == "compare" and value is not None:
            print_result(value, top=6, console=console)
        elif name == "bisect" and value is not None:
            print_bisect(value, console=console)
        elif name == "precision" and value is not None:
            print_plan(value, console=console)
        elif name == "eval" and value is not None:
            print_eval(value, console=console)
        elif name in ("inspect", "build", "bench") or value is None:
            lead = "\n" if name != "inspect" else ""
            console.print(f"{lead}[bold]{name}[/]: {'' if step.status in ('ok', 'passed') else step.status + ': '}"
                          f"{escape(step.summary)}")


def _story(console: Console, verdict, plan, evaluation) -> None:
    console.rule("[bold]what aligner found")
    if evaluation is None:
        console.print("* No evaluation ran; see the steps above.")
        return
    fp32, fp16 = evaluation["ort:cpu:fp32"].stats["AP"], evaluation["emu:fp16"].stats["AP"]
    cause = verdict.root_cause if verdict is not None else None
    if cause is not None:
        console.print(f"* The FP16 build first goes wrong at {escape(cause.node)} ({escape(cause.op_type)}, kind {cause.kind}): "
                      f"{escape(cause.reason)}.")
    console.print(f"* Pure FP16 costs {100 * (fp32 - fp16):.2f} AP points on the val split ({fp32:.4f} → {fp16:.4f}); no output is "
                  "NaN, so only a layer-wise compare or a task metric shows it.")
    if plan is None or not any(t.target == "emu:fp16+plan" for t in evaluation.targets):
        console.print("* No precision plan was needed or found; see plan.json and plan.trials.jsonl.")
        return
    mixed = evaluation["emu:fp16+plan"].stats["AP"]
    console.print(f"* Keeping {len(plan.pins)} node(s) in FP32 ({escape(', '.join(plan.fp32_nodes))}; found in {plan.trials} trials, "
                  f"each pin proven necessary) gives AP {mixed:.4f}, {100 * (fp32 - mixed):+.2f} points from FP32, with "
                  f"{plan.fp16_flop_fraction:.0%} of the Conv/MatMul FLOPs still in FP16.")
