"""``aligner build``: the deployable mixed-precision model of a plan, for ONNX Runtime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from aligner.backends import parse_target
from aligner.cli.common import add_input_arguments, add_model_arguments, check_writable, resolve_feeds
from aligner.compare import compare
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.graph.precision import rewrite_precision
from aligner.inputs import write_atomic
from aligner.search.plan import read_plan

EPILOG = """\
The built model carries explicit Casts at every FP32/low-precision boundary: the same rewrite the
FP16 emulator mirrors and the precision search verified, and the form ONNX Runtime, TensorRT
(strongly typed, 10.12+/11) and TensorRT-RTX all take. Before writing, the rewrite is checked
against the FP32 model on the emulator with --inputs (or generated inputs): outputs finite, rel_l2
reported. Use real data: random inputs may not reach the ranges that overflow.

For trt:* the same rewrite is parsed by TensorRT (or TensorRT-RTX: ALIGNER_TENSORRT=tensorrt_rtx)
into a strongly typed network and serialized; parser failures name each node (op, name, why).

Graph passes first (--fuse; aligner plugins list): the fused model is checked against the original
on ORT CPU FP32 and nothing is written if an output moved. --layer-precision takes TensorRT <= 10's
legacy path (FP16 flag + per-layer FP32 constraints on the plan's nodes) for engines that must be
built that way; TensorRT 11 and TensorRT-RTX have only the strongly typed path.

examples:
  aligner build model.onnx --target ort:cuda:fp16 --plan plan.json -o model.ort.onnx
  aligner build model.onnx --fuse layernorm,masked-softmax --target ort:cpu:fp32 -o model.fused.onnx
  aligner build model.fused.onnx --target trt:fp16 --plan plan.json -o model.engine
  aligner build model.onnx --target trt:fp16 --plan plan.json -o model.engine --input-shapes pixels:1x3x128x128
  aligner build model.onnx --target ort:cuda:bf16 -o model.bf16.onnx          # no plan: pure BF16

exit status: 0 written, 1 the check found diverging outputs (written only with --force), 2 usage or input error
"""


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="write the deployable mixed-precision model of a plan",
                       description="Write the FP16/BF16 model with a precision plan's nodes kept in FP32 (explicit Casts).",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--target", default="ort:cuda:fp16", help="ort:*:fp16|bf16 (mixed ONNX) or trt:fp32|fp16|bf16 (engine; default ort:cuda:fp16)")
    p.add_argument("--plan", metavar="PLAN.json", help="precision plan (aligner precision --out); without it: pure low precision")
    p.add_argument("-o", "--output", required=True, metavar="ONNX", help="the model to write")
    p.add_argument("--force", action="store_true", help="overwrite, and write even when the check finds NaN/inf")
    p.add_argument("--fuse", metavar="PASSES", help="comma-separated graph passes first, verified against the original on ORT CPU "
                   "FP32: layernorm (-> LayerNormalization, opset 17), masked-softmax, roi-align (-> aligner plugin ops; "
                   "aligner plugins list)")
    p.add_argument("--plugins", nargs="+", metavar="LIB", help="trt: plugin libraries to load before parsing")
    p.add_argument("--timing-cache", metavar="FILE", help="trt: timing cache to read and update")
    p.add_argument("--layer-precision", action="store_true", help="trt (TensorRT <= 10 only): per-layer precision constraints on the "
                   "FP32 graph instead of the strongly typed rewrite (the flags are gone in TensorRT 11 and TensorRT-RTX)")
    p.add_argument("--ort-optimized", metavar="ONNX", help="ort: also write ONNX Runtime's optimized model for the target's provider")
    add_input_arguments(p)


def _fused(graph: ModelGraph, args: argparse.Namespace) -> ModelGraph:
    """Apply --fuse passes and check the result against the original (FP32 tolerance) on ORT CPU."""
    if not args.fuse:
        return graph
    from aligner.passes import PASSES

    fused = graph
    console = Console(highlight=False)
    names = [n.strip() for n in args.fuse.split(",") if n.strip()]
    for name in names:
        if name not in PASSES:
            raise InputError(f"--fuse {name!r}: unknown pass; available: {', '.join(PASSES)}.")
    for name in names:
        result = PASSES[name](fused)
        fused = ModelGraph(result.model, graph.path)
        console.print(f"--fuse {name}: {len(result.fused)} pattern(s) replaced" + (f", {len(result.skipped)} left as they are" if result.skipped else ""))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.nodes if n.domain in ("mmcv", "mmdeploy")})
    if foreign:  # the original itself cannot run on ONNX Runtime: nothing to check against
        console.print(f"[yellow]warning[/]: the original has {', '.join(foreign)} nodes, which ONNX Runtime cannot run without "
                      "their own custom-op library, so the fused model was not compared with it (the plugin's reference is "
                      "tested against mmcv's semantics); run aligner compare with both models where that library is loaded.")
        return fused
    check = compare(graph, target="ort:cpu:fp32", target_model=fused, feeds=resolve_feeds(graph, args), tensors=graph.output_names)
    if check.first_divergent is not None:
        raise InputError(f"--fuse changed the outputs beyond FP32 tolerance ({check.verdict()}); not written.")
    worst = max((t.metrics.get("rel_l2", 0.0) for t in check.tensors), default=0.0)
    console.print(f"fused model checked against the original on ort:cpu:fp32: outputs rel_l2 ≤ {worst:.2g}")
    return fused


def _build_trt(args: argparse.Namespace) -> int:
    from aligner.backends.tensorrt import build_engine, sidecar
    from aligner.inputs import parse_input_shapes

    precision = args.target.split(":")[-1]
    graph = _fused(ModelGraph.load(args.model, check=not args.no_check), args)
    shapes, plugins, pins = parse_input_shapes(args.input_shapes), args.plugins or [], read_plan(args.plan)
    engine = build_engine(graph, precision, pins, shapes, plugins=plugins, timing_cache=args.timing_cache, layer_precision=args.layer_precision)
    console = Console(highlight=False)
    for pin in engine.unmatched_pins:
        console.print(f"[yellow]warning[/]: plan node {escape(pin)} matches no TensorRT layer (fused or renamed): its precision is not constrained")
    write_atomic(Path(args.output), engine.data)
    write_atomic(Path(args.output + ".json"), json.dumps(sidecar(engine, graph, precision, pins, shapes, plugins, not args.layer_precision), indent=1).encode())
    how = "with per-layer precision constraints" if args.layer_precision else "strongly typed"
    console.print(f"[bold green]wrote[/] {escape(args.output)}: {len(engine.data) / 2**20:.1f} MiB engine built "
                  f"{how} by {engine.module} {engine.version} ({precision}, {len(pins)} node(s) FP32)")
    return 0


def run(args: argparse.Namespace) -> int:
    check_writable([args.output, args.ort_optimized], args.force)
    if args.target.startswith("trt"):
        return _build_trt(args)
    target = parse_target(args.target)
    if target.runtime != "ort":
        raise InputError(f"--target {args.target}: aligner build writes models for ONNX Runtime (ort:*) or engines (trt:*).")
    graph = _fused(ModelGraph.load(args.model, check=not args.no_check), args)
    if target.precision in ("fp32", "tf32"):
        write_atomic(Path(args.output), graph.model.SerializeToString())
        Console(highlight=False).print(f"[bold green]wrote[/] {escape(args.output)} (FP32)")
        return 0
    pins = read_plan(args.plan)
    result = rewrite_precision(graph, pins, target.precision)
    check = compare(graph, target=f"emu:{target.precision}", feeds=resolve_feeds(graph, args), tensors=graph.output_names, fp32_nodes=pins)
    console = Console(highlight=False)
    bad = [t for t in check.tensors if t.diverges]  # NaN/inf, or beyond the precision's tolerance
    worst = max((t.metrics.get("rel_l2", 0.0) for t in check.tensors), default=0.0)
    console.print(f"{len(result.pinned)} node(s) kept FP32 by the plan, {len(result.auto_pinned)} automatically "
                  f"(no {target.precision} kernel in the ONNX schema), {result.casts_inserted} Cast(s) inserted; "
                  f"check on emu:{target.precision}: outputs rel_l2 ≤ {worst:.3g}" + (f"; {len(bad)} output(s) diverge ({check.tolerance.metric} > {check.tolerance.threshold:g} or NaN/inf)" if bad else ""))
    for o in result.overflows:
        console.print(f"[yellow]warning[/]: weight {escape(o.tensor)}: {o.count} value(s) up to {o.max_abs:.3g} become inf in {target.precision}")
    if bad and not args.force:
        console.print("[bold red]not written[/]: the built model's outputs diverge from FP32 on these inputs; run `aligner precision` "
                      "for a plan (then --plan plan.json), or pass --force.")
        return 1
    write_atomic(Path(args.output), result.model.SerializeToString())
    console.print(f"[bold green]wrote[/] {escape(args.output)}")
    if args.ort_optimized:
        from aligner.plugin import has_plugins

        if has_plugins(result.model):
            raise InputError("--ort-optimized: the model has aligner plugin ops, which ONNX Runtime runs through onnxruntime-extensions "
                             "custom ops; its optimized file would hold that session-only form. Ship the mixed model itself.")
        _ort_optimized(args.output, args.ort_optimized, target)
        console.print(f"[bold green]wrote[/] {escape(args.ort_optimized)} (ONNX Runtime's optimized graph for {target.device})")
    return 0


def _ort_optimized(model_path: str, out: str, target) -> None:
    import onnxruntime as ort

    from aligner.backends.onnxruntime import providers_for

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(model_path, options, providers=providers_for(target))
