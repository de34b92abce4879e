"""``aligner doctor``: the demo's pipeline (inspect → compare → bisect → precision → build → bench →
report) on the user's own model; the work is :func:`aligner.doctor.doctor`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aligner.cli.common import (OutputDir, TARGETS_HELP, add_input_arguments, add_model_arguments, check_writable, input_samples,
                                input_source, positive_int)
from aligner.cli.eval import add_coco_arguments, coco_from_args
from aligner.doctor import STEPS, DoctorResult, doctor
from aligner.search.bisect import STRATEGIES

EPILOG = f"""\
steps (each writes under --out and prints the command that re-runs it alone on the same inputs,
saved as OUT/inputs.npz; with --inputs-dir, every sample is in OUT/samples/ and precision searches
on all of them while compare, bisect, build and bench run the first):
  1 inspect    nodes at static FP16 risk                      OUT/inspect.json
  2 compare    the target against the reference, every tensor OUT/runs/compare, compare.json
  3 bisect     first divergent node, root cause, repro        OUT/runs/bisect, OUT/culprit/
  4 precision  smallest verified set of nodes kept FP32       OUT/plan.json, plan.trials.jsonl
  5 build      the deployable model, checked against FP32     OUT/model.<precision>.onnx (+ .json sidecar)
  6 eval       COCO AP of FP32, the target and its plan       OUT/eval.json, OUT/runs/eval
  7 bench      its latency beside FP32 and the pure precision OUT/bench.json, OUT/runs/bench
  8 report     one self-contained HTML page                   OUT/report.html
bisect and precision run only when the target diverges; eval only with a task metric (below). An
emulated target (emu:fp16) is built and timed on ONNX Runtime CPU at its precision (the emulator's
own speed means nothing). A target that cannot run here (ort:cuda without a GPU, a missing extra)
stops at the step that needs it, exit 3.

task metric: give a COCO dataset as aligner eval coco takes it (--data, --ann, --adapter and the
preprocessing flags; --example-data for the built-in example's). Then, unless --inputs or
--inputs-dir give others, the first --batch images are the inputs of compare, bisect, build and
bench (--input-shapes only sizes them); the plan must keep COCO AP within --max-ap-drop of FP32
(outputs finite; the output tolerance does not bind); a target whose outputs match on those images
but whose AP drops further still diverges; the eval step scores FP32, the target and the plan.

examples:
  aligner doctor model.onnx                                   # emu:fp16, generated inputs
  aligner doctor det.onnx --target ort:cuda:fp16 --inputs sample.npz --out doctor-det
  aligner doctor det.onnx --input-shapes x:1x3x640x640        # symbolic dims: the sizes to run
  aligner doctor cls.onnx --target ort:cpu:int8 --calib calib/ --inputs test.npz
  aligner doctor det.onnx --target ort:cpu:fp16 --inputs-dir samples/ # a plan verified on every sample
  aligner doctor det.onnx --data val2017/ --ann instances_val2017.json --adapter detr \
      --input-size 800x800 --scale 0.00392157 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
  aligner doctor aligner-demo/shapes_detector.onnx --example-data --batch 50 --strategy all  # = aligner demo

exit status: 0 the target agrees with the reference, or a verified plan and a checked build fix it;
1 it diverges and no plan fixes it; 2 usage or input error; 3 a step's target cannot run here

{TARGETS_HELP}"""


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="the whole pipeline on your model: risks, divergence, root cause, plan, build, speed, report",
                       description="Run inspect, compare, bisect, precision, build, eval (with a COCO dataset) and bench on a model "
                                   "for one target and write one report; every step's outputs stay under --out with the command that re-runs it alone.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", default="emu:fp16", help="the target to check and fix (default emu:fp16); see 'targets' below")
    p.add_argument("--out", default="aligner-doctor", help="folder for every step's outputs (default ./aligner-doctor)")
    p.add_argument("--bench-runs", type=_runs, default=20, help="timed runs per target in the bench step (default 20; 0 skips it)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="bisect's search strategy (default auto; see aligner bisect -h)")
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds files")
    add_input_arguments(p)
    t = p.add_argument_group("task metric (COCO; the flags of aligner eval coco)")
    add_coco_arguments(p, batch=16, group=t, acceptance=True)


def _runs(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def run(args: argparse.Namespace) -> int:
    from aligner.backends.target import Target
    from aligner.graph.model import ModelGraph
    from aligner.inputs import save_inputs
    from aligner.quant.calib import with_calibration

    check_writable([OutputDir(args.out)], args.force)
    target, source = Target.parse(args.target), input_source(args)
    graph = ModelGraph.load(args.model, check=not args.no_check)
    task = coco_from_args(args, graph, max_drop=args.max_ap_drop)
    samples = input_samples(graph, args) if task is None or source else None
    if task is not None and not source:  # a dataset's first batch of images is the inputs (--input-shapes only sizes them)
        samples = [task.feeds(graph)]
        if target.is_quantized and not args.calib:  # and, without --calib, the calibration data (with with_calibration's warning)
            source = str(Path(args.out) / "inputs.npz")
            save_inputs(samples, source, force=True)
    target = with_calibration(target, args.calib, source)
    console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress on stderr; commands stay copyable

    def progress(number: int, step: str, message: str) -> None:
        console.print(f"[bold][{number}/{len(STEPS)}] {step}[/]: {escape(message)}")

    result = doctor(graph, target, args.out, samples, bench_runs=args.bench_runs, progress=progress,
                    inputs=input_source(args) or (task.source() if task is not None else None), task=task, strategy=args.strategy)
    print_summary(result)
    return result.exit_code


def print_summary(result: DoctorResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    console.rule(f"[bold]aligner doctor: {escape(result.target)}")
    mark = {"ok": "[green]ok[/]", "passed": "[green]passed[/]", "diverged": "[red]diverged[/]", "failed": "[red]failed[/]",
            "skipped": "skipped"}
    for step in result.steps:
        console.print(f"{step.name:<10} {mark[step.status]}: {escape(step.summary)}")
    if not result.diverged:
        verdict = "[bold green]OK[/] the target agrees with the reference on these inputs."
    elif result.fixed and not result.pins:
        verdict = ("[bold green]OK at the outputs[/]: tensors inside diverge (see compare and bisect), but the outputs stay within "
                   "the tolerance in pure low precision; check a task metric (aligner eval) before shipping.")
    elif result.fixed and result.residual:
        verdict = (f"[bold yellow]FIXED AT THE OUTPUTS[/]: the plan's nodes bring the outputs back within tolerance and the build is "
                   f"checked, but {escape(result.residual)}.")
    elif result.fixed:
        verdict = ("[bold green]FIXED[/] the plan's nodes in higher precision bring the target back within its acceptance "
                   f"({'the task metric' if result.step('eval') and result.step('eval').status != 'skipped' else 'the tolerance'}); "
                   "the build is checked.")
    else:
        verdict = "[bold red]DIVERGED[/] and not fixed: see the bisect and precision steps."
    console.print(verdict)
    console.print(f"report: {escape(result.report or '-')}; every step's files and re-run commands: {escape(result.out)}/doctor.json")
