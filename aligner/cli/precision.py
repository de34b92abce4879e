"""``aligner precision``: the smallest verified set of FP32 nodes for an FP16/BF16 build, or of nodes
kept in float for an INT8 build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aligner.backends import check_target
from aligner.backends.target import Target
from aligner.cli.common import (add_input_arguments, add_model_arguments, add_report_arguments, add_tolerance_arguments, check_writable,
                                emit_run, input_samples, input_source, non_negative_float, parse_options, report_paths,
                                tolerance_from_args)
from aligner.compare.tolerance import defaults_text
from aligner.graph.model import ModelGraph
from aligner.inputs import write_atomic
from aligner.search.plan import PrecisionPlan
from aligner.backends.replay import FEW_SAMPLES, judged_on_own_data
from aligner.search.precision import executor_for, search_precision, verdict
from aligner.report.console import fit_table, print_workers

TABLE_ROWS = 40  # the final table's rows at most (the plan JSON and the report list every node)

EPILOG = f"""\
how it searches:
  1. pure low precision (a model that passes needs no plan: one trial);
  2. seeds from one reference run: nodes that write or read values beyond the low type's range
     (FP16 max 65504), e.g. the Pow/ReduceMean/Add/Sqrt of a decomposed LayerNorm on large
     activations, a BatchNormalization with a running variance above 65504, a Div by values that
     flush to zero; while pinning them fails, add the node where NaN/inf (else the divergence)
     starts in that trial;
  3. delta debugging until removing any single pin makes the check fail (1-minimal).
  Every trial is appended to the trials log (JSONL); --resume LOG continues from it.

INT8 (--target ort:cpu:int8, emu:int8): a pin is a node kept in float (excluded from ONNX
  Runtime's quantizer, nodes_to_exclude). Before the search, --sweep (default on) quantizes the whole
  model with each calibration method (minmax, entropy, percentile) x reduce_range and keeps the
  setting with the smallest output error on the target's real kernels. ONNX Runtime quantizes a
  tensor when any node next to it is quantized, so the search moves by tensors: each quantized
  tensor gives a group (the nodes that must all stay float for it to stay unquantized), ranked by
  the tensor's own share of the output error with only it quantized (one emulated run per tensor
  on a switchable Q/DQ model, on the inputs and calibration data: no quantizer call). Nodes whose
  integer kernel loses accuracy that Q/DQ in float does not come first. Trials find the shortest
  passing prefix of the groups (doubling, then halving), then remove kept nodes in blocks (large
  while removals pass, one node at a time once they fail), in passes until none goes: 1-minimal.
  Every trial re-quantizes (calibration is cached) and runs on the target. The plan
  records the quantizer settings and calibration; --save-model writes the QDQ model with the plan's
  nodes kept in float; ort:cpu:int8+plan.json runs it in compare, bisect, eval and bench.

acceptance: compare's rule, on every output of every input sample — an output passes exactly when
  `aligner compare` would not call it divergent: its NaN/inf pattern is the reference's, and
  --metric (default rel_l2) is within --threshold OR max_abs is at most --atol (so outputs that
  are ~0 on both sides pass). Defaults by precision (threshold/atol):
  {defaults_text()}.
  --metric/--threshold/--atol   the same flags and defaults as compare
  --accept SPEC      the same rule written out, repeatable: 'rel_l2<=5e-3' (atol stays the default,
                     or --atol), 'rel_l2<=5e-3 (or max_abs<=1e-4)', 'cosine>=0.999'; one output's
                     rule: 'boxes: rel_l2<=1e-2'; 'finite': NaN/inf only, no metric bound (with
                     --accept-cmd: your task metric alone decides)
  --accept-cmd CMD   your task metric, on top of the rule: CMD runs with {{model}} = the mixed
                     ONNX; exit 0 = pass
  A plan that keeps every node out of the low precision is no plan (exit 1), and a search cut
  short by --max-trials says NOT VERIFIED (exit 1): resume it with --resume LOG (and --force, since
  --out then exists).

examples:
  aligner precision model.onnx
  aligner precision det.onnx --data val2017/ --ann instances_val2017.json --adapter detr --max-ap-drop 0.005 \\
      --input-size 800x800 --scale 0.00392157 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225   # COCO AP decides
  aligner precision model.onnx --target ort:cuda:fp16 --accept "rel_l2<=5e-3" --inputs calib.npz \\
      --out plan.json --save-model model.mixed.onnx
  aligner precision model.onnx --accept-cmd "python my_eval.py {{model}}"
  aligner precision model.onnx --accept finite --accept-cmd "python my_eval.py {{model}}"
  aligner precision model.onnx --threshold 5e-3 --atol 1e-4
  aligner precision model.onnx --out plan.json --resume plan.trials.jsonl --force   # plan.json exists
  aligner precision model.onnx --target ort:cpu:int8 --calib calib/ --accept "rel_l2<=0.02" \\
      --out plan.json --save-model model.int8.onnx
  aligner precision model.onnx --target ort:cpu:int8@calibrate=entropy --calib calib/ --no-sweep \\
      --accept-cmd "python eval.py {{model}}"

workers: --workers N runs independent trials (delta debugging's removals, speculated a few at a
  time) in N local processes; --workers ray (or ray://HOST:PORT) as Ray actors across a cluster
  (pip install aligner[ray]). The plan and the trials log are the serial search's: parallelism
  changes when a trial runs, never which result is used, so --resume works across both. The
  summary gives each worker's trials and the speed-up. INT8 searches run the settings sweep and
  the trials on the workers (each gets the calibrated ranges once, never the calibration data).

exit status: 0 a plan was found and verified, 1 no passing plan or not verified, 2 usage or input error
"""


def add_parser(sub) -> None:
    p = sub.add_parser("precision", help="smallest verified set of FP32 nodes for an FP16 build (float nodes for INT8)",
                       description="Search the smallest set of nodes to keep in FP32 so that the FP16 (or BF16) build passes an acceptance check "
                       "(for INT8 targets: nodes kept in float, not quantized); every pin is verified necessary.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", default="emu:fp16", help="low-precision target (default emu:fp16; ort:cuda:fp16 on a GPU), "
                   "written as in every command: runtime[:device][:precision][@key=value,...]")
    p.add_argument("--target-option", action="append", metavar="KEY=VALUE", default=[],
                   help="a runtime option of the target (repeatable), e.g. cudnn_conv_algo_search=HEURISTIC")
    add_tolerance_arguments(p)
    p.add_argument("--accept", action="append", default=[], metavar="SPEC",
                   help="the rule written out, e.g. 'rel_l2<=5e-3' or 'boxes: rel_l2<=1e-2' (repeatable; see below)")
    p.add_argument("--accept-cmd", metavar="CMD", help="external check on top of the rule; {model} is replaced by the mixed model's "
                   "path; exit 0 = pass")
    p.add_argument("--max-trials", type=int, default=200, help="stop after this many trials (default 200); resume later")
    p.add_argument("--workers", default="1", metavar="N|ray|ray://HOST:PORT",
                   help="run independent trials at once: N local processes (default 1), or Ray (see below); same plan")
    p.add_argument("--capture-budget-mb", type=non_negative_float, default=512,
                   help="memory for tensors held at once, as compare's (default 512 MB): the value ranges, INT8's isolation and its "
                        "ranking's batches (one sample's activations at least)")
    p.add_argument("--no-fusion-check", dest="fusion_check", action="store_false",
                   help="skip checking whether a passing plan relies on the runtime's fusions (on a fusing target the plan is re-run on "
                        "the plain emulator on CPU, and searched there if it fails: up to 20 more trials on CPU)")
    q = p.add_argument_group("INT8 targets")
    q.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="first pick the quantizer setting (calibration method x reduce_range) with the smallest full-INT8 error (default on)")
    add_input_arguments(p)
    from aligner.cli.eval import add_coco_arguments

    add_coco_arguments(p, batch=16, group=p.add_argument_group("task metric instead of the output rule (COCO; the flags of aligner "
                                                                "eval coco)"), acceptance=True)
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="PLAN.json", help="write the plan (pins, reasons, metrics, TensorRT strings)")
    o.add_argument("--save-model", metavar="ONNX", help="write the mixed-precision model of the plan")
    o.add_argument("--trials", metavar="JSONL", help="trials log (default: next to --out as *.trials.jsonl)")
    o.add_argument("--resume", metavar="JSONL", help="continue a search from its trials log (with --force when --out or --save-model already exist)")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_report_arguments(p)


def run(args: argparse.Namespace) -> int:
    trials = args.trials or (str(Path(args.out).with_suffix("")) + ".trials.jsonl" if args.out else None)
    resuming_same = args.resume and trials and Path(args.resume).resolve() == Path(trials).resolve()
    check_writable([args.out, args.save_model, args.save_inputs] + ([] if resuming_same else [trials]) + report_paths(args), args.force)
    target = Target.parse(args.target, options=parse_options(args.target_option))
    if target.is_quantized or args.calib:
        from aligner.quant.calib import with_calibration

        target = with_calibration(target, args.calib, input_source(args))
    target = check_target(target)
    graph = ModelGraph.load(args.model, check=not args.no_check)
    from aligner.cli.eval import coco_from_args
    from aligner.errors import InputError

    task = coco_from_args(args, graph, max_drop=args.max_ap_drop)  # a COCO dataset: AP within --max-ap-drop decides
    if task is not None and (args.accept or args.accept_cmd):
        raise InputError("Give the acceptance once: a COCO dataset (--data/--ann or --example-data, with --max-ap-drop) or "
                         "--accept/--accept-cmd, not both.")
    samples = [task.feeds(graph)] if task is not None and not input_source(args) else input_samples(graph, args)
    accept = task.acceptance(graph) if task is not None else tolerance_from_args(args, target)
    console = Console(stderr=True, highlight=False)
    from aligner.quant.calib import reporting

    executor = executor_for(args.workers, target)
    with executor, console.status("measuring value ranges on the reference...") as status, reporting(_phase_progress(console, status)):
        def progress(trial, n: int) -> None:
            mark = "[green]pass[/]" if trial.passed else ("[red]error[/]" if trial.error else "fail")
            console.print(f"trial {n:3d}/{args.max_trials}{_worker_tag(trial, executor)} {trial.phase:<8} {len(trial.pins):4d} pins  {mark}  "
                          f"{escape(trial.reason or trial.error)[:90]}")
            status.update(f"trial {n + 1}/{args.max_trials}...")

        plan = search_precision(graph, target=target, samples=samples, accept=accept, trials_log=trials,
                                resume=args.resume, max_trials=args.max_trials, save_model=args.save_model, progress=progress,
                                sweep=args.sweep and target.is_quantized, fusion_check=args.fusion_check, workers=executor,
                                capture_budget_mb=args.capture_budget_mb)
    print_plan(plan)
    print_workers(executor.stats(), "trial")
    if verdict(plan)[0] == "NOT VERIFIED:":
        print_resume_hint(args, trials)
    if args.out:
        write_atomic(Path(args.out), json.dumps(plan.to_dict(), indent=1).encode())
    emit_run(args, "precision", graph, plan.to_dict(), Path(trials) if trials else None, samples=samples)
    return 0 if plan.passed else 1


def print_resume_hint(args: argparse.Namespace, trials: str | None, console: Console | None = None) -> None:
    """How to go on with a search the trial cap cut short: the same command with --resume, a larger
    --max-trials and, since its outputs now exist, --force."""
    console = console or Console(highlight=False, soft_wrap=True)
    if not trials:
        console.print("to resume later, run it again with --out PLAN.json (its trials log, PLAN.trials.jsonl, is what --resume "
                      "continues from).")
        return
    written = [p for p in (args.out, args.save_model) if p]
    why = f" ({', '.join(written)} now exist{'s' if len(written) == 1 else ''}: without --force the command stops there)" if written else ""
    console.print(f"to go on: run the same command with --resume {escape(trials)} --max-trials {2 * args.max_trials}"
                  + (f" --force{escape(why)}" if written else "") + "; the trials already run are not run again.")


def _phase_progress(console: Console, status):
    """INT8's long phases: the status line on a terminal; piped, one line as each phase starts."""
    last = [""]

    def show(phase: str, done: int, total: int) -> None:
        status.update(f"{escape(phase)} {done}/{total}")
        if not console.is_terminal and phase != last[0]:
            console.print(f"{escape(phase)} {done}/{total}")
        last[0] = phase

    return show


def print_plan(plan: PrecisionPlan, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    if plan.pins:
        kept = "in float (not quantized)" if plan.precision == "int8" else "in FP32"
        table = Table(title=f"{len(plan.pins)} node(s) kept {kept} ({escape(plan.target)})", title_justify="left")
        table.add_column("node", overflow="fold", ratio=2)
        table.add_column("op", no_wrap=True)
        table.add_column("why", overflow="fold", ratio=3)
        for pin in plan.pins[:TABLE_ROWS]:
            table.add_row(escape(pin.node), escape(pin.op_type), escape(pin.reason))
        if len(plan.pins) > TABLE_ROWS:
            table.add_row(f"... {len(plan.pins) - TABLE_ROWS} more", "", "every node with its reason: the plan JSON (--out) and the report")
        console.print(fit_table(console, table))  # names elided in the middle at narrow widths, never wrapped per letter
        console.print("op types: " + ", ".join(f"{escape(k)} x{v}" for k, v in plan.op_type_summary().items()))
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in plan.final_metrics.items() if k in ("rel_l2", "max_abs", "cosine"))
    head, why = verdict(plan)
    colour = {"PASSED": "bold green", "NOT VERIFIED:": "bold yellow"}.get(head, "bold red")
    stats = (f"{len(plan.pins)} pin(s), {plan.trials} trial(s) (+{plan.culprit_runs} target runs locating culprits); "
             f"{plan.fp16_flop_fraction:.1%} of Conv/MatMul/Gemm FLOPs stay in {plan.precision.upper()}; "
             f"accept: {escape('; '.join(plan.accept))}" + (f"; final {metrics}" if metrics else ""))
    console.print(f"[{colour}]{head}[/] " + (f"{escape(why)}\n{stats}" if why else stats))
    if plan.quantization:
        print_quantization(plan.quantization, console)
    for note in plan.notes[1 if why else 0:]:
        console.print(f"note: {escape(note)}")
    if plan.fusion_dependence:
        console.print(f"[bold yellow]fusion:[/] {escape(plan.fusion_dependence)}")
    if plan.inside:
        console.print(f"[bold yellow]inside:[/] {escape(plan.inside)}")
    samples = plan.verified.get("samples", FEW_SAMPLES) if plan.verified else FEW_SAMPLES
    if plan.passed and samples < FEW_SAMPLES and not judged_on_own_data(plan.accept):
        console.print(f"[bold yellow]few samples:[/] verified on {samples} input sample(s): its acceptance may not hold on others "
                      f"(a classifier plan searched on 4 images agreed with FP32 on 90.6 % of 32 fresh ones). Pass at least "
                      f"{FEW_SAMPLES} representative samples with --inputs-dir DIR.")
    if plan.passed or plan.final_metrics:  # a trial passed: the verdict line says why it is no plan
        return
    if plan.precision == "int8":
        console.print("Tried pure INT8 and keeping the ranked quantized tensors' nodes in float (the shortest passing prefix); "
                      "see the trials log for each attempt.")
    else:
        console.print(f"Tried pure {plan.precision}, the {len(plan.seeds)} seed(s) from the value ranges, and growing by "
                      "each failing trial's NaN/inf origin; see the trials log for each attempt.")


def print_quantization(record: dict, console: Console) -> None:
    """The quantizer settings a plan was searched with, and the sweep that chose them."""
    settings = record.get("settings", {})
    sweep = record.get("sweep", [])
    if sweep:
        table = Table(title="quantizer settings sweep (full INT8 on the target's kernels)", title_justify="left")
        table.add_column("settings")
        metric = next((k for k in sweep[0] if k not in ("settings", "options", "seconds", "error")), "rel_l2")
        table.add_column(metric, justify="right")
        table.add_column("s", justify="right")
        for point in sweep:
            value = point.get(metric)
            table.add_row(escape(point["settings"]), "failed" if value is None else f"{value:.4g}", f"{point['seconds']:.1f}")
        console.print(table)
    if record.get("opset"):
        console.print(f"opset: {escape(record['opset'])}")
    calib = record.get("calibration", {})
    console.print("quantizer: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + f"; calibration: {escape(str(calib.get('source')))} "
                  f"({calib.get('samples')} sample(s))")


def _worker_tag(trial, executor) -> str:
    """' [w2]': which worker ran a trial, when several do (nothing for trials from a resumed log)."""
    return escape(f" [{trial.worker}]") if executor.workers > 1 and trial.worker else ""
