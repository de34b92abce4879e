"""``aligner build``: the deployable model of a target — parse, one :func:`aligner.build.build` call, exit code."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aligner.build import BuildResult, build, build_outputs, build_target
from aligner.cli.common import (add_input_arguments, add_model_arguments, add_tolerance_arguments, check_writable, input_source, positive_int, resolve_feeds,
                                resolve_target, tolerance_from_args)
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import parse_input_shapes
from aligner.tune import TuneResult, TuneSettings, check_tunable

EPILOG = """\
The built model carries explicit Casts at every FP32/low-precision boundary: the same rewrite the
FP16 emulator mirrors and the precision search verified, and the form ONNX Runtime, TensorRT
(strongly typed, 10.12+/11) and TensorRT-RTX all take. Before writing, the rewrite is checked
against the FP32 model on the emulator (same FP32 nodes) with --inputs (or generated inputs)
under compare's rule: --metric/--threshold/--atol when given, else the rule the plan was verified
with (its recorded acceptance), else the precision's default; rel_l2 reported. A build that fails the
check is not written; --write-anyway writes it all the same (the exit status still says 1).
--force only allows overwriting existing files: it never skips the check. Use real data: random
inputs may not reach the ranges that overflow.

Beside the output, OUTPUT.json records the build: the target in full (plan file, runtime options),
the check and its tolerance, the passes, and for engines the TensorRT version and settings.

For trt:* the same rewrite is parsed by TensorRT (or TensorRT-RTX: ALIGNER_TENSORRT=tensorrt_rtx)
into a strongly typed network and serialized; parser failures name each node (op, name, why).
Runtime options ride on the target (@key=value or --target-option): ort:cuda CUDA provider options
for --ort-optimized, trt builder settings builder_optimization_level, workspace_mb, timing_cache.

--tune (ort:* targets) measures the runtime options on the built model before writing it: each
candidate is built and run once, rejected when ONNX Runtime fails (e.g. cuDNN "No execution
plans") or when its outputs diverge from the FP32 model on ort:cpu:fp32 beyond the target's
tolerance, and the rest are timed side by side (--tune-rounds interleaved rounds of --tune-runs
runs after warm-up; medians). Candidates within 3% of the fastest are ties, won by the one that
changes fewest options (the defaults first). One change at a time, then the best combination:
  ort:cuda  cudnn_conv_algo_search=HEURISTIC|DEFAULT (default EXHAUSTIVE), prefer_nhwc=1,
            cudnn_conv_use_max_workspace=0, use_tf32=1 (fp16/bf16: the FP32 parts),
            enable_cuda_graph=1 (static input shapes only)
  ort:cpu   intra_op_num_threads=1|<cores>, graph_optimization_level=extended|basic
Options given with the target (@key=value) are fixed. The inputs (--inputs / --input-shapes) set
the batch it is tuned at. The winners go into the target recorded in OUTPUT.json with every
candidate's median ms, spread and status; aligner bench, eval, compare and bisect given the built
model (or OUTPUT.json) run it with those options.

INT8 (ort:cpu:int8, ort:cuda:int8, trt:int8): the model is quantized by ONNX Runtime's quantizer
(QDQ; calibration from --calib; a plan's nodes kept in float and its quantizer settings reused)
and checked against FP32 by the same rule (the plan's: its recorded acceptance, or with a plan
accepted by a command or task metric alone, outputs finite and a note to re-run that on the build;
without a plan, INT8's default). ort:cpu checks on the integer kernels; ort:cuda and trt with Q/DQ in float
(emu:int8). The QDQ model is stamped, so compare/bench/eval run it as built; trt:int8 quantizes
signed and symmetric (s8s8, zero point 0), the only INT8 TensorRT takes, and builds the engine
strongly typed from the QDQ model.

Graph passes first (--fuse; aligner plugins list): the fused model is checked against the original
on ORT CPU FP32 and nothing is written if an output moved. --layer-precision takes TensorRT <= 10's
legacy path (FP16 flag + per-layer FP32 constraints on the plan's nodes) for engines that must be
built that way; TensorRT 11 and TensorRT-RTX have only the strongly typed path.

examples:
  aligner build model.onnx --target ort:cuda:fp16 --plan plan.json -o model.ort.onnx
  aligner build model.onnx --fuse layernorm,masked-softmax --target ort:cpu:fp32 -o model.fused.onnx
  aligner build model.fused.onnx --target trt:fp16 --plan plan.json -o model.engine
  aligner build model.onnx --target trt:fp16@builder_optimization_level=5 --plan plan.json -o model.engine \\
      --input-shapes pixels:1x3x128x128
  aligner build model.onnx --target ort:cuda:bf16 -o model.bf16.onnx          # no plan: pure BF16
  aligner build model.onnx --target ort:cuda:fp16 --plan plan.json --tune -o model.fp16.onnx --input-shapes images:8x3x480x640
  aligner bench model.fp16.onnx --batch 1,8                                  # runs with the tuned options
  aligner build model.onnx --target ort:cpu:int8 --plan int8.json --calib calib/ --inputs held_out.npz -o model.int8.onnx
  aligner build model.onnx --target trt:int8 --plan int8.json --calib calib/ -o model.int8.engine

exit status: 0 written (check passed), 1 the check found diverging outputs (written only with
--write-anyway), 2 usage or input error, 3 the target failed to build
"""


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="write the deployable mixed-precision model (or engine) of a plan",
                       description="Write the FP16/BF16 model with a precision plan's nodes kept in FP32 (explicit Casts), "
                                   "the INT8 QDQ model with a plan's nodes kept in float, or a TensorRT engine, after checking it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", default="ort:cuda:fp16", help="ort:*:fp16|bf16 (mixed ONNX), ort:*:int8 (QDQ ONNX), ort:*:fp32 "
                   "(passes only) or trt:fp32|fp16|bf16|int8 (engine); default ort:cuda:fp16")
    p.add_argument("--plan", metavar="PLAN.json", help="precision plan (aligner precision --out); without it: pure low precision")
    p.add_argument("--fp32-nodes", metavar="NAMES", help="comma-separated nodes kept FP32 (added to the plan's)")
    p.add_argument("--target-option", action="append", metavar="KEY=VALUE", default=[],
                   help="a runtime option of the target (repeatable), e.g. builder_optimization_level=5")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the model (or engine) to write; FILE.json beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing output files (the accuracy check still runs and decides)")
    p.add_argument("--write-anyway", action="store_true", help="write the build even when the accuracy check finds diverging "
                   "outputs (the check is still run, reported and recorded; exit status 1)")
    p.add_argument("--fuse", metavar="PASSES", help="comma-separated graph passes first, verified against the original on ORT CPU "
                   "FP32: layernorm (-> LayerNormalization, opset 17), masked-softmax, roi-align (-> aligner plugin ops; "
                   "aligner plugins list)")
    p.add_argument("--plugins", nargs="+", metavar="LIB", help="trt: plugin libraries to load before parsing")
    p.add_argument("--timing-cache", metavar="FILE", help="trt: timing cache to read and update (the option timing_cache)")
    p.add_argument("--layer-precision", action="store_true", help="trt (TensorRT <= 10 only): per-layer precision constraints on the "
                   "FP32 graph instead of the strongly typed rewrite (the flags are gone in TensorRT 11 and TensorRT-RTX)")
    p.add_argument("--ort-optimized", metavar="ONNX", help="ort: also write ONNX Runtime's optimized model for the target's provider")
    t = p.add_argument_group("tuning (ort:* targets; see below)")
    t.add_argument("--tune", action="store_true", help="measure the candidate runtime options on the built model and keep the "
                   "fastest that passes the accuracy check (recorded in OUTPUT.json)")
    t.add_argument("--tune-rounds", type=positive_int, default=TuneSettings.rounds, help=f"interleaved timing rounds (default {TuneSettings.rounds})")
    t.add_argument("--tune-runs", type=positive_int, default=TuneSettings.runs, help=f"timed runs per candidate per round (default {TuneSettings.runs})")
    add_tolerance_arguments(p)
    add_input_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_writable([str(p) for p in build_outputs(args.output, args.ort_optimized)], args.force)
    target = resolve_target(args)
    if args.timing_cache:
        target = target.with_options({"timing_cache": args.timing_cache})
    target = build_target(target)  # checked before the model is loaded
    calibrated = args.calib or any("calib=" in s for s in (args.target or "", *args.target_option))  # not --inputs, the check's data
    if target.is_quantized and not calibrated:
        raise InputError(f"Target {target.base}: an INT8 build needs calibration data: --calib FILE.npz|DIR/ with representative "
                         "inputs (not the --inputs the build is checked on).")
    if args.tune:
        check_tunable(target)
    ruled = args.threshold is not None or args.atol is not None or args.metric != "rel_l2"
    tolerance = tolerance_from_args(args, target) if ruled else None  # else the plan's rule or the default (aligner.build.build_rule)
    graph = ModelGraph.load(args.model, check=not args.no_check)
    fuse = [n.strip() for n in (args.fuse or "").split(",") if n.strip()]
    tuning = TuneSettings(rounds=args.tune_rounds, runs=args.tune_runs) if args.tune else None
    errors = Console(stderr=True, highlight=False)
    feeds = resolve_feeds(graph, args)
    shapes = parse_input_shapes(args.input_shapes) or ({k: tuple(v.shape) for k, v in feeds.items()} if input_source(args) else {})
    result = build(graph, target, args.output, fuse=fuse, check_inputs=feeds,
                   input_shapes=shapes, write_anyway=args.write_anyway, force=args.force,
                   ort_optimized=args.ort_optimized, plugins=args.plugins or [], layer_precision=args.layer_precision,
                   tuning=tuning, progress=lambda line: errors.print(f"tune: {escape(line)}"), tolerance=tolerance)
    print_build(result)
    return 0 if result.passed else 1


def print_build(result: BuildResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    for step in result.fused:
        console.print(f"--fuse {step.name}: {step.replaced} pattern(s) replaced" + (f", {len(step.skipped)} left as they are" if step.skipped else ""))
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    precision = result.target.precision
    if result.quantization is not None:
        _print_quantization(result, console)
    elif result.check is not None:
        check = result.check
        console.print(f"{result.pinned} node(s) kept FP32 by the plan, {result.auto_pinned} automatically (no {precision} kernel in the "
                      f"ONNX schema), {result.casts_inserted} Cast(s) inserted; check on {check.on}: outputs rel_l2 ≤ {check.worst_rel_l2:.3g}"
                      + (f"; {len(check.diverging)} output(s) diverge ({escape(check.rule())} broken, or NaN/inf)"
                         if check.diverging else ""))
    for o in result.overflows:
        console.print(f"[yellow]warning[/]: weight {escape(o.tensor)}: {o.count} value(s) up to {o.max_abs:.3g} become inf in {precision}")
    for pin in result.unmatched_pins:
        console.print(f"[yellow]warning[/]: plan node {escape(pin)} matches no TensorRT layer (fused or renamed): its precision is not constrained")
    if result.tuning is not None:
        print_tuning(result.tuning, console)
    if not result.written:
        console.print("[bold red]not written[/]: the built model's outputs diverge from FP32 on these inputs; run `aligner precision` "
                      "for a plan (then --plan plan.json), or pass --write-anyway.")
        return
    if not result.passed:
        console.print("[bold yellow]written anyway[/] (--write-anyway): its outputs diverge from FP32 on these inputs.")
    what = (f"{result.engine['bytes'] / 2**20:.1f} MiB engine built {'strongly typed' if result.engine['strongly_typed'] else 'with per-layer precision constraints'} "
            f"by {result.engine['module']} {result.engine['version']}" if result.engine else f"{precision.upper()} ONNX"
            + (" (QDQ)" if result.quantization else ""))
    console.print(f"[bold green]wrote[/] {escape(result.output)}: {what} for {escape(str(result.target.base))}, "
                  f"{len(result.target.pins)} node(s) {'in float' if result.quantization else 'FP32'}; sidecar {escape(str(result.sidecar))}")
    if result.ort_optimized:
        console.print(f"[bold green]wrote[/] {escape(result.ort_optimized)} (ONNX Runtime's optimized graph for {result.target.device})")


def _print_quantization(result: BuildResult, console: Console) -> None:
    """INT8 builds: how the QDQ model was quantized and calibrated, and its check."""
    from aligner.quant.quantize import QuantSettings

    q, check = result.quantization, result.check
    settings = QuantSettings(**q["settings"]).describe()
    console.print(f"quantized by ONNX Runtime ({escape(settings)}; calibration {escape(str(q['calibration']['source']))}, "
                  f"{q['calibration']['samples']} sample(s)), {len(q['excluded'])} node(s) kept in float; check on {escape(check.on)}: "
                  f"outputs rel_l2 ≤ {check.worst_rel_l2:.3g} ({escape(check.rule())})"
                  + (f"; [red]{len(check.diverging)} output(s) fail it[/]" if check.diverging else ""))
    if check.diverging and not result.target.pins:
        console.print("full INT8 loses too much here: find the nodes to keep in float with `aligner precision MODEL --target "
                      f"{escape(result.target.base)} --calib ... --out plan.json`, then build with --plan plan.json.")


def print_tuning(tuning: TuneResult, console: Console) -> None:
    """The candidates side by side, the winner marked, and why it won."""
    table = Table(title=f"runtime options tuned on {escape(tuning.target.base)} (inputs "
                  f"{escape(', '.join('x'.join(map(str, s)) for s in tuning.input_shapes.values()))}; ties within {tuning.settings.noise:.0%})",
                  title_justify="left")
    for col, justify in (("options", "left"), ("median ms", "right"), ("spread ms", "right"), ("status", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for c in tuning.candidates:
        won = tuning.chosen is not None and c.options == tuning.chosen and c.status == "ok"
        status = "[bold green]chosen[/]" if won else ("ok" if c.status == "ok" else f"[red]{c.status}[/]: {escape(c.reason)}")
        table.add_row(escape(c.label) + (" (combined)" if c.phase == 2 and len(c.options) > 1 else ""),
                      "-" if c.median_ms is None else f"{c.median_ms:.3f}", "-" if c.spread_ms is None else f"{c.spread_ms:.3f}", status)
    console.print(table)
    style = "bold" if tuning.chosen is not None else "bold yellow"
    console.print(f"[{style}]tuned[/]: {escape(tuning.decision)}")
