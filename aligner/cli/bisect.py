"""``aligner bisect``: the first divergent node, its root cause and a standalone repro."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aligner.cli.common import (TARGETS_HELP, non_negative_float, non_negative_int, add_input_arguments, add_target_arguments, add_report_arguments, emit_run, report_paths, add_model_arguments, add_tolerance_arguments, check_writable, load_models_and_feeds,
                                resolve_target, tolerance_from_args)
from aligner.inputs import write_atomic
from aligner.search import STRATEGIES, BisectResult, bisect
from aligner.search.executor import parse_workers
from aligner.report.console import fit_table

EPILOG = f"""\
strategies (all answer the same question as compare, with the same tolerance, and name the same
first divergent node; they differ in what each target run captures):
  auto      (default) 'all' when every tensor fits one capture group and the target is ONNX
            Runtime or the emulator, else 'frontier'
  all       capture every tensor once on each side (in groups of --capture-budget-mb)
  frontier  judge each cut of the topological order by the tensors crossing it and halve the
            range: ceil(log2 N)+1 target runs; a divergence that a later node masks is found by
            comparing every tensor before the transition (every tensor when the outputs match):
            they ride along in the halving runs up to --capture-budget-mb (a cut whose tensors
            were all compared already costs no run), and the rest are swept in capture groups
            after it (--sweep-runs caps those runs): ceil(log2 N)+2 runs at most whenever the
            halving runs have room for the tensors before the transition; --capture-budget-mb 0
            captures only each cut. The verdict and the JSON ("runs") say how many runs of each kind.
  isolate   like 'all', plus every node's own error: each node run on the target with the
            reference's values of its inputs (decoupled graph), so inherited error does not count
  The first divergent node and its ancestors among the --window nodes before it are isolated
  to name the root cause (every strategy).

root cause kinds:
  local      the node's own arithmetic (or, with --target-model, its edited definition)
  nonfinite  the node makes NaN/inf from finite inputs; the input range that did it is named
  discrete   TopK/ArgMax/comparison whose choice flipped on a tiny input error
  inherited  no node's own error exceeds the tolerance: the error built up gradually

{TARGETS_HELP}
examples:
  aligner bisect model.onnx
  aligner bisect model.onnx --target ort:cuda:fp16 --strategy frontier --json verdict.json
  aligner bisect model.onnx --target-model edited.onnx --save-repro culprit/
  aligner bisect model.onnx --target ort:cpu:int8 --calib calib/ --strategy isolate   # own quantization error per node

when the target cannot build or run the model at all (a crash, or a refused model), bisect runs
prefixes of the graph instead and names the first node whose presence makes it fail (the smallest
failing prefix is saved under --save-repro), runs that node alone, and tries the whole model with
the node kept FP32 and with a lower optimization level, saying which of these fixes it.

exit status: 0 no divergence, 1 divergence found, 2 usage or input error, 3 target failed to build or run
"""


def add_parser(sub) -> None:
    p = sub.add_parser("bisect", help="first divergent node and its root cause",
                       description="Find where the target starts to diverge from the reference, and why, in as few target runs as possible.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_target_arguments(p, "bisect")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="search strategy (default auto; see below)")
    p.add_argument("--window", type=non_negative_int, default=16, help="nodes before the first divergent one whose own errors are measured (default 16)")
    p.add_argument("--sweep-runs", type=non_negative_int, help="frontier: at most this many target runs searching for masked divergences "
                   "(default: as many as the capture budget needs, which makes the answer complete)")
    add_input_arguments(p)
    add_tolerance_arguments(p)
    p.add_argument("--workers", default="1", metavar="N|ray|ray://HOST:PORT",
                   help="run the probes that are separate runs at once: the frontier search's next levels (a k-ary search "
                        "asking what the binary search asks), the capture groups of --strategy all and of the sweep; same verdict")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the verdict, the probes and the local errors as JSON")
    o.add_argument("--save-repro", metavar="DIR", help="write the culprit's subgraph (model.onnx), its inputs (inputs.npz) and expected outputs")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    o.add_argument("--capture-budget-mb", type=non_negative_float, default=512, help="memory for captured tensors of one group, both sides (default 512 MB)")
    add_report_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_writable([args.json, args.save_inputs] + report_paths(args), args.force)
    workers = parse_workers(args.workers)
    target = resolve_target(args)
    tolerance = tolerance_from_args(args, target)
    graph, other, feeds = load_models_and_feeds(args)
    console = Console(stderr=True, highlight=False)
    with console.status("bisecting...") as status:
        def progress(phase: str, done: int, total: int) -> None:
            status.update(f"{phase}: target run {done}")

        result = bisect(
            graph, target=target, reference=args.reference, target_model=other, feeds=feeds,
            strategy=args.strategy, tolerance=tolerance, capture_budget_mb=args.capture_budget_mb,
            window=args.window, sweep_runs=args.sweep_runs, save_repro=args.save_repro, force=args.force, progress=progress,
            workers=workers,
        )
    print_result(result)
    if args.json:
        write_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1).encode())
    emit_run(args, "bisect", graph, result.to_dict(), samples=[feeds])
    if result.failed:
        return 3
    return 1 if result.diverged else 0


def print_result(result: BisectResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    table = Table(title=f"probes ({escape(result.target)} vs {escape(result.reference)}, strategy {result.strategy_used})", title_justify="left")
    for col in ("run", "phase", "cut after node", "tensors", "diverged", "NaN/inf"):
        table.add_column(col, overflow="fold")
    flag = {True: "[red]yes[/]", False: "no", None: "-"}
    for i, p in enumerate(result.probes, 1):
        after = "" if p.cut is None else (f"#{p.index} {escape(p.node)}" if p.index is not None else "(graph outputs)")
        tensors = str(p.tensors) if not p.swept else f"{p.tensors - p.swept} (+{p.swept} swept)"
        table.add_row(str(i), p.phase if p.status == "ok" else f"[red]{p.phase} FAILED[/]", after, tensors, flag[p.diverged], flag[p.nonfinite])
    console.print(fit_table(console, table))  # names elided in the middle at narrow widths, never wrapped per letter
    cause = result.root_cause
    if result.first_divergent is not None:
        f = result.first_divergent
        console.print(f"first divergent: [bold]{escape(f.node)}[/] ({escape(f.op_type)}, #{f.index}) tensor {escape(f.tensor)}")
    if cause is not None:
        console.print(f"root cause:      [bold]{escape(cause.node)}[/] ({escape(cause.op_type)}) kind [bold]{cause.kind}[/]")
    _print_int8_kernels(result, console)
    if result.nonfinite_origin is not None:
        o = result.nonfinite_origin
        ranges = ", ".join(f"{escape(r.tensor)} in [{r.min:.3g}, {r.max:.3g}]" for r in o.inputs)
        console.print(f"NaN/inf origin:  [bold]{escape(o.node)}[/] ({escape(o.op_type)}); inputs {ranges}")
    shown = [e for e in result.local_errors if e.metrics][:5]
    if shown and (cause is None or cause.kind == "inherited"):
        console.print("largest local errors: " + "; ".join(f"{escape(e.node)} ({escape(e.op_type)}) {', '.join(f'{k} {v:.2g}' for k, v in e.metrics.items() if k in ('rel_l2', 'max_abs'))}" for e in shown))
    if result.failure_site is not None:
        f = result.failure_site
        console.print(f"fails from:      [bold]{escape(f.node)}[/] ({escape(f.op_type)}, #{f.index}): the first {f.index} nodes run, "
                      f"{f.prefix_nodes} fail{'' if f.repro is None else '; prefix saved as ' + escape(f.repro)}")
    if result.repro is not None:
        r = result.repro
        console.print(f"repro: {escape(r.model)} ({'reproduces' if r.reproduces else '[red]does not reproduce[/]'} on its own): {escape(r.command)}")
    head = "[bold red]FAILED[/] " if result.failed else ("[bold red]DIVERGED[/] " if result.diverged else "[bold green]OK[/] ")
    console.print(head + escape(result.explanation))


def _print_int8_kernels(result: BisectResult, console: Console) -> None:
    """INT8 targets: which nodes' own error is the integer kernel's rather than quantization's."""
    from aligner.search.isolate import kernel_or_quantization

    tol = result.tolerance
    judged = [(e, kernel_or_quantization(e, tol)) for e in result.local_errors]
    kernel = [e for e, why in judged if why == "kernel"]
    quant = [e for e, why in judged if why == "quantization"]
    key = f"emulated_{tol.metric}"
    if quant:
        console.print("quantization error (also with Q/DQ in float): " + ", ".join(
            f"{escape(e.node)} {tol.metric} {e.metrics[tol.metric]:.2g}" for e in quant[:5]))
    if kernel:
        console.print("[bold]integer-kernel error[/] (small with Q/DQ in float, large on the kernel; try reduce_range=1): " + ", ".join(
            f"{escape(e.node)} {tol.metric} {e.metrics[tol.metric]:.2g} vs emulated {e.metrics[key]:.2g}" for e in kernel[:5]))
