"""``aligner demo``: the built-in example, start to finish, with no arguments."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aligner.cli.bisect import print_result as print_bisect
from aligner.cli.compare import print_result
from aligner.cli.precision import print_plan
from aligner.compare import compare
from aligner.errors import InputError
from aligner.examples import example_inputs, tiny_vit
from aligner.graph.model import ModelGraph
from aligner.graph.risk import fp16_risks
from aligner.inputs import save_inputs, write_atomic
from aligner.report import write_report, write_run
from aligner.search import bisect
from aligner.search.precision import search_precision

MARKER = ".aligner-demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run aligner on the built-in example model",
                       description="Build the example (a tiny ViT that reads raw 0-255 pixels, whose LayerNorm variance overflows FP16), compare FP32 with emulated FP16, bisect to the root cause, search the smallest FP32 plan and tell the story.")
    p.add_argument("--out", default="aligner-demo", help="folder for the model, inputs and results (default ./aligner-demo)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise InputError(f"{out} exists and was not made by aligner demo; choose another --out.")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    console = Console(highlight=False)
    model_path = out / "tiny_vit.onnx"
    write_atomic(model_path, tiny_vit().SerializeToString())
    feeds = example_inputs()
    save_inputs([feeds], out / "inputs.npz", force=True)
    graph = ModelGraph.load(model_path)
    console.rule("[bold]aligner demo")
    console.print(f"Model: {model_path} ({len(graph.nodes)} nodes, opset {graph.opset}); input 'pixels' holds raw 0-255 values.")
    risks = fp16_risks(graph)
    console.print(f"inspect: {len(risks)} node(s) at static FP16 risk, e.g. {escape(risks[0].node)}: {escape(risks[0].reason)}" if risks else "inspect: no static risks")
    console.print("\n[bold]compare[/]: ORT CPU FP32 (reference) vs emu:fp16 (every stored tensor rounded to FP16)")
    result = compare(graph, target="emu:fp16", feeds=feeds)
    print_result(result, top=8, console=console)
    write_atomic(out / "compare.json", json.dumps(result.to_dict(), indent=1).encode())
    first = result.first_nonfinite or result.first_divergent
    if first is not None:
        row = next(t for t in result.tensors if t.tensor == first.tensor)
        src = graph.node(first.node)
        from aligner.backends import reference_runner

        seen = reference_runner(graph).run(feeds, [src.input[0]])[src.input[0]]
        console.print(
            f"\n[bold]What happened:[/] {escape(first.op_type)} node {escape(first.node)} (#{first.index}) is the first to "
            f"produce inf ({row.nonfinite_target.total} values) from finite inputs: it squares '{escape(src.input[0])}', "
            f"whose values reach {abs(seen).max():.0f} because the model reads unnormalised pixels, and "
            f"{abs(seen).max():.0f}^2 = {abs(seen).max() ** 2:.3g} > 65504 (FP16 max). "
            "The LayerNorm variance becomes inf, x/sqrt(var) becomes 0, and every token collapses to the bias."
        )
    logits = result.tensors[-1]
    console.print(f"Output {escape(logits.tensor)}: rel_l2 {logits.metrics['rel_l2']:.3g} vs FP32.")

    console.print("\n[bold]bisect[/]: the same question answered with few target runs (frontier strategy: only the "
                  "tensors crossing a cut are captured), then the culprit run alone on reference inputs")
    verdict = bisect(graph, target="emu:fp16", feeds=feeds, strategy="frontier", save_repro=out / "culprit", force=True)
    print_bisect(verdict, console=console)
    write_atomic(out / "bisect.json", json.dumps(verdict.to_dict(), indent=1).encode())

    console.print("\n[bold]precision[/]: the smallest set of nodes to keep in FP32 so the FP16 logits pass "
                  "(finite, rel_l2 <= 2e-2), each pin verified necessary")
    plan = search_precision(graph, target="emu:fp16", samples=[feeds], trials_log=_fresh(out / "plan.trials.jsonl"),
                            save_model=out / "tiny_vit.mixed.onnx")
    print_plan(plan, console=console)
    write_atomic(out / "plan.json", json.dumps(plan.to_dict(), indent=1).encode())
    if len(plan.pins) < len(plan.seeds):
        console.print(f"{len(plan.seeds)} node(s) read or write values beyond 65504 on these inputs, yet only {len(plan.pins)} must "
                      "stay FP32 for the outputs to pass: where the residual path carries the signal past a collapsed "
                      "LayerNorm, its overflow does not reach the logits. A task metric (--accept-cmd) may ask for more.")

    runs = [write_run(out / "runs" / "compare", "compare", graph, result.to_dict(), force=True),
            write_run(out / "runs" / "bisect", "bisect", graph, verdict.to_dict(), force=True),
            write_run(out / "runs" / "precision", "precision", graph, plan.to_dict(), out / "plan.trials.jsonl", force=True)]
    report = write_report(runs, out / "report.html", force=True, title="aligner demo: tiny ViT on raw pixels, FP16")
    console.print(f"\n[bold]report[/]: {report} (one self-contained page: open it in any browser). "
                  f"Done in {time.perf_counter() - start:.1f} s.")
    console.print(f"Files in {out}/: report.html, runs/, tiny_vit.onnx, inputs.npz, compare.json, bisect.json, culprit/ "
                  "(standalone repro), plan.json, plan.trials.jsonl, tiny_vit.mixed.onnx.")
    console.print(f"Try: aligner bisect {model_path} --inputs {out / 'inputs.npz'} --strategy isolate")
    return 0


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)  # the demo folder is aligner's own: start the log anew
    return path
