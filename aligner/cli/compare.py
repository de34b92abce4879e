"""``aligner compare``: layer-by-layer diff of a target (or a second graph) against the reference."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aligner.cli.common import (TARGETS_HELP, non_negative_float, non_negative_int, add_input_arguments, add_target_arguments, resolve_feeds, add_report_arguments, emit_run, report_paths, add_model_arguments, add_tolerance_arguments, check_writable, load_models_and_feeds,
                               resolve_target, tolerance_from_args)
from aligner.compare import CompareResult, compare
from aligner.inputs import write_atomic
from aligner.report.console import fit_table
from pathlib import Path

EPILOG = f"""\
{TARGETS_HELP}
examples:
  aligner compare model.onnx --target emu:fp16
  aligner compare model.onnx --target ort:cpu:fp16 --json diff.json --csv diff.csv
  aligner compare original.onnx --target-model simplified.onnx
  aligner compare model.onnx --inputs batch.npz --metric cosine --threshold 0.999
  aligner compare model.onnx --target ort:cpu:int8 --calib calib/      # every tensor, dequantized vs float
  aligner compare model.onnx --target emu:int8@calibrate=percentile --calib calib/ --inputs held_out.npz

exit status: 0 no divergence, 1 divergence found, 2 usage or input error, 3 target failed to run
"""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="layer-by-layer diff against the reference",
                       description="Run the model on the reference and the target, capture every intermediate tensor on both, and report where they diverge.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_target_arguments(p, "compare")
    p.add_argument("--tensors", metavar="NAMES", help="comma-separated tensors to compare (default: every node output)")
    add_input_arguments(p)
    add_tolerance_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every tensor's metrics and the summary as JSON")
    o.add_argument("--csv", metavar="FILE", help="write the per-tensor table as CSV")
    o.add_argument("--top", type=non_negative_int, default=10, help="divergent tensors to print (default 10)")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    o.add_argument("--capture-budget-mb", type=non_negative_float, default=512, help="memory for captured tensors of one group, both sides (default 512 MB)")
    o.add_argument("--whole-model-groups", action="store_true",
                   help="capture each group with a run of the whole model (slower) instead of cutting the model into segments "
                        "that run once each; the default falls back to this by itself when a segmented run moves the target's outputs")
    add_report_arguments(p)
    t = p.add_argument_group("PyTorch (module by module)")
    t.add_argument("--torch", metavar="MODULE:FUNCTION", help="a factory returning the nn.Module (e.g. mypkg.models:build_detector); compares its "
                   "module outputs with the ONNX model's tensors on --target; exports the model first if the .onnx is missing")
    t.add_argument("--torch-inputs", metavar="NPZ", help="the PyTorch inputs, in forward() order (npz of arrays; default: the ONNX inputs' generated values)")
    t.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy", help="exporter used when the .onnx does not exist")


def run(args: argparse.Namespace) -> int:
    if args.torch:
        return _run_torch(args)
    check_writable([args.json, args.csv, args.save_inputs] + report_paths(args), args.force)
    target = resolve_target(args)
    tolerance = tolerance_from_args(args, target)
    from aligner.backends import backend_of
    from aligner.backends.ort.sandbox import sandbox

    if backend_of(target).sandboxed(target):
        sandbox().warm()  # the child imports ONNX Runtime while the model loads
    graph, other, feeds = load_models_and_feeds(args)
    console = Console(stderr=True, highlight=False)
    with Progress(TextColumn("[bold]capture groups"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("capture", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = compare(
            graph, target=target, reference=args.reference, target_model=other, feeds=feeds,
            tensors=args.tensors.split(",") if args.tensors else None, tolerance=tolerance,
            capture_budget_mb=args.capture_budget_mb, progress=progress, segments=not args.whole_model_groups,
        )
    print_result(result, args.top)
    if args.json:
        write_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1).encode())
    if args.csv:
        write_atomic(Path(args.csv), result.to_frame().to_csv(index=False).encode())
    emit_run(args, "compare", graph, result.to_dict(), samples=[feeds])
    return 1 if result.first_divergent else 0


def print_result(result: CompareResult, top: int = 10, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    metric = result.tolerance.metric
    rows = result.diverging[:top]
    if rows:
        table = Table(title=f"first {len(rows)} of {len(result.diverging)} divergent tensors ({escape(result.target)} vs {escape(result.reference)})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("node", overflow="fold", ratio=3)
        table.add_column("op", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        table.add_column(metric, no_wrap=True)
        table.add_column("NaN/inf ref→tgt", no_wrap=True)
        for t in rows:
            table.add_row(str(t.index), escape(t.node), escape(t.op_type), "x".join(map(str, t.shape)),
                          f"{t.metrics.get(metric, float('nan')):.3g}", f"{t.nonfinite_ref.total}→{t.nonfinite_target.total}")
        console.print(fit_table(console, table))  # names elided in the middle at narrow widths, never wrapped per letter
    if result.unmatched:
        console.print(f"{len(result.unmatched)} reference tensor(s) have no counterpart in the target and were skipped.")
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(("[bold red]DIVERGED[/] " if result.first_divergent else "[bold green]OK[/] ") + escape(result.verdict()))


def _run_torch(args: argparse.Namespace) -> int:
    import numpy as np

    from aligner.cli.common import load_torch_factory
    from aligner.compare.torch_compare import compare_torch
    from aligner.errors import InputError
    from aligner.inputs import load_inputs

    check_writable([args.json], args.force)
    model = load_torch_factory(args.torch)
    if args.torch_inputs:
        arrays = list(load_inputs(args.torch_inputs)[0].values())
    else:
        from aligner.graph.model import ModelGraph

        if not Path(args.model).exists():
            raise InputError("--torch-inputs is needed when the .onnx does not exist yet (the export needs example inputs).")
        graph = ModelGraph.load(args.model)
        arrays = list(resolve_feeds(graph, args).values())
    import torch

    result = compare_torch(model, [torch.from_numpy(np.asarray(a)) for a in arrays], onnx=args.model,
                           target=resolve_target(args), target_model=args.target_model, exporter=args.exporter)
    console = Console(highlight=False)
    rows = [m for m in result.modules if m.diverges][: args.top]
    if rows:
        table = Table(title=f"first {len(rows)} divergent modules (torch:cpu:fp32 vs {escape(result.target)})", title_justify="left")
        for col in ("module", "type", "call", "ONNX tensor", "match", result.tolerance.metric):
            table.add_column(col, overflow="fold")
        for m in rows:
            table.add_row(escape(m.path), escape(m.type_name), str(m.call), escape(m.tensor), m.how,
                          f"{m.metrics.get(result.tolerance.metric, float('nan')):.3g}")
        console.print(table)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(("[bold red]DIVERGED[/] " if result.first_divergent else "[bold green]OK[/] ") + escape(result.verdict()))
    if args.json:
        write_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1).encode())
    return 1 if result.first_divergent else 0
