"""``aligner bench``: latency and throughput per target and batch size, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from aligner.bench import BenchResult, bench
from aligner.cli.common import (add_input_arguments, add_model_arguments, add_report_arguments, check_writable, emit_run, input_source,
                                model_sidecar, report_paths, resolve_feeds, resolve_targets)
from aligner.backends.target import split_targets
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import parse_input_shapes, write_atomic
from aligner.report.console import fit_table

EPILOG = """\
Targets are ONNX Runtime targets (ort:cpu:fp32|fp16|bf16, ort:cuda:fp32|tf32|fp16|bf16), TensorRT
(trt:fp32|fp16|bf16) and PyTorch eager (torch:cpu:fp32, torch:cuda:fp32|tf32|fp16|bf16|autocast, with
--torch MODULE:FUNCTION); add +plan to keep a precision plan's nodes in FP32 (--plan plan.json) and
@key=value,... for runtime options (ort: graph_optimization_level, intra_op_num_threads,
inter_op_num_threads, execution_mode; ort:cuda: CUDA provider options such as
cudnn_conv_algo_search=HEURISTIC, use_tf32, prefer_nhwc; torch: cudnn_benchmark, channels_last;
trt: builder_optimization_level, workspace_mb, timing_cache). Each row names its target in full,
options included.

A built model (aligner build -o MODEL) runs with the options of its sidecar MODEL.json (give the
model or the JSON): with no --target, the target it was built for; targets of the same runtime and
device take its options, explicit @key=value win. A lower precision measured slower than a higher
one (fp16/bf16 < tf32 < fp32, same runtime, device and batch, beyond a 3% noise band) is flagged with
both medians and the option to try (ort:cuda: @cudnn_conv_algo_search=HEURISTIC, or build --tune);
the JSON lists it under "inversions". On CUDA, inputs and outputs stay on the GPU (I/O binding) and each run is
synchronised before the clock is read; the first --warmup runs are not timed. Latency: median /
p90 / p99 of --runs runs; throughput = batch / median latency.

examples:
  aligner bench model.onnx --target ort:cuda:fp16 --batch 1,2,4,8,16 --json bench.json
  aligner bench model.onnx --target ort:cuda:fp32,ort:cuda:fp16,ort:cuda:fp16+plan --plan plan.json --batch 1,8 --report bench.html
  aligner bench model.onnx --target ort:cuda:fp16,ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC --batch 8
  aligner bench model.fp16.onnx --batch 1,8            # a build: its sidecar's target and tuned options
  aligner bench det.onnx --input-shapes x:1x3x640x640 --batch 1,4   # symbolic dims: sizes given, batch set per row
  aligner bench det.onnx --inputs sample.npz            # sizes (and the default batch) from the data

inputs: generated (uniform [0, 1)) unless --inputs (or --inputs-dir: its first sample) gives them;
symbolic dims take their sizes from the data or --input-shapes, and a symbolic batch dim is set to
each --batch (default: the batch of the inputs or shapes given, else 1); samples are repeated to
fill a larger batch. INT8 targets (ort:cpu:int8) calibrate on --calib (else the inputs given).

exit status: 0 measured, 2 usage or input error, 3 a target failed to build or run
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="latency / throughput per target and batch size",
                       description="Time the model on one or more ONNX Runtime targets and batch sizes, side by side in one run.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", help="comma-separated targets (default: a built model's own target, else ort:cpu:fp32); "
                   "a target's own @key=value,... options stay with it")
    p.add_argument("--batch", help="comma-separated batch sizes (default: the batch of --inputs / --input-shapes, else 1)")
    p.add_argument("--plan", metavar="PLAN.json", help="precision plan for the +plan targets")
    p.add_argument("--runs", type=int, default=100, help="timed runs per point (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--torch", metavar="MODULE:FUNCTION", help="the PyTorch module for torch:* targets (eager), fed the ONNX input's shape")
    p.add_argument("--json", metavar="FILE", help="write {device, rows: [{target, batch, latency_ms, throughput}]}")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_input_arguments(p, generated=False)
    add_report_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_writable([args.json] + report_paths(args), args.force)
    specs = split_targets(args.target) if args.target else None
    targets = resolve_targets(args, specs if specs or model_sidecar(args) else ["ort:cpu:fp32"])  # a built model: its sidecar
    graph = ModelGraph.load(args.model, check=not args.no_check)
    if specs is None and model_sidecar(args) is not None:
        targets = [_runnable_here(t) for t in targets]
    if any(t.is_quantized for t in targets) or args.calib:
        from aligner.quant.calib import with_calibration

        targets = [with_calibration(t, args.calib, input_source(args)) for t in targets]
    inputs = resolve_feeds(graph, args) if input_source(args) else None
    shapes = parse_input_shapes(args.input_shapes)
    batches = _batch_sizes(args.batch, graph, inputs, shapes)
    module = None
    if args.torch:
        from aligner.cli.common import load_torch_factory

        module = load_torch_factory(args.torch)
    with Progress(TextColumn("[bold]timing"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=len(targets) * len(batches))
        result = bench(graph, targets, batches, args.plan, args.runs, args.warmup, lambda s, d, t: bar.update(task, completed=d), module,
                       inputs=inputs, shapes=shapes)
    print_bench(result)
    if args.json:
        write_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1).encode())
    emit_run(args, "bench", graph, result.to_dict(), samples=[inputs] if inputs is not None else None)
    return 0


def _batch_sizes(text: str | None, graph: ModelGraph, inputs: dict | None, shapes: dict) -> list[int]:
    """--batch, else the leading dim of the first input as given (--inputs, --input-shapes), else 1."""
    if text is None:
        first = graph.input_names[0]
        given = inputs[first].shape if inputs and first in inputs else shapes.get(first)
        return [given[0]] if given and given[0] > 0 else [1]
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise InputError(f"--batch {text!r}: write comma-separated integers, e.g. 1,2,4,8.") from None


def _runnable_here(target):
    """A built model's own target, or, where this machine cannot run its device (a model built for
    ort:cuda on a machine without CUDA), the same precision on a device it has, said on stderr."""
    from aligner.backends import backend_of

    here, why = backend_of(target).runnable_here(target)
    if here != target:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"note: the model was built for {escape(str(target))}, which cannot run on this machine: {escape(why)}\n"
            f"Timing it on {escape(str(here))} instead; give --target to choose.")
    return here


def print_bench(result: BenchResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    table = Table(title=f"latency and throughput on {escape(result.device)}", title_justify="left")
    gpu = any(r.gpu_memory_mb is not None for r in result.rows)  # no GPU column on a CPU machine: the table fits 80 columns
    table.add_column("target", overflow="fold")
    for col in ("batch", "median ms", "p90 ms", "p99 ms", "items/s") + (("GPU MiB",) if gpu else ()):
        table.add_column(col, justify="right", no_wrap=True)
    for r in result.rows:
        memory = ("-" if r.gpu_memory_mb is None else f"{r.gpu_memory_mb:.0f}",) if gpu else ()
        table.add_row(escape(r.target), str(r.batch), f"{r.latency_ms['median']:.3f}", f"{r.latency_ms['p90']:.3f}",
                      f"{r.latency_ms['p99']:.3f}", f"{r.throughput:.1f}", *memory)
    console.print(fit_table(console, table))
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    for inversion in result.inversions:
        console.print(f"[bold yellow]warning[/]: {escape(inversion.message)}")
