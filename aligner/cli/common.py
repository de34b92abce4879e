"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from aligner.backends import parse_target
from aligner.compare.metrics import METRICS
from aligner.compare.tolerance import Tolerance, default_tolerance
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import load_inputs, make_inputs, parse_input_shapes, save_inputs, validate_feeds


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to the .onnx model (external-data and >2 GiB models work)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX checker when loading")


def add_target_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """--target, --reference, --target-model, as every comparing command takes them."""
    p.add_argument("--target", help="target to check (default emu:fp16; ort:cpu:fp32 with --target-model)")
    p.add_argument("--reference", default="ort:cpu:fp32", help="reference (default ort:cpu:fp32, graph optimizations off)")
    p.add_argument("--target-model", metavar="ONNX",
                   help=f"{verb} a second graph (edited, simplified) against the model on the reference runtime; tensors and nodes matched by name")
    p.add_argument("--fp32-nodes", metavar="NAMES", help="comma-separated nodes kept FP32 in a low-precision target")


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--inputs", metavar="FILE", help="input values: .npz, or Polygraphy's JSON (polygraphy run --save-inputs)")
    g.add_argument("--input-shapes", nargs="+", metavar="NAME:DIMS", help="shapes for symbolic dims, e.g. images:1x3x800x800")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated random inputs (default 0)")
    g.add_argument("--save-inputs", metavar="FILE", help="write the inputs used (.npz, or .json in Polygraphy's format)")


def resolve_feeds(graph: ModelGraph, args: argparse.Namespace) -> dict:
    if args.inputs:
        feeds = validate_feeds(graph, load_inputs(args.inputs)[0])
    else:
        feeds = make_inputs(graph, parse_input_shapes(args.input_shapes), seed=args.seed)
    if args.save_inputs:
        save_inputs([feeds], args.save_inputs, force=getattr(args, "force", False))
    return feeds


def check_writable(paths: list[str | None], force: bool) -> None:
    """Refuse to overwrite user files unless --force (checked before any long work starts)."""
    for path in paths:
        if path and Path(path).exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite it.")


def add_tolerance_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tolerance")
    t.add_argument("--metric", choices=sorted(METRICS), default="rel_l2", help="metric of the divergence rule (default rel_l2)")
    t.add_argument("--threshold", type=float, help="divergence threshold (default per precision: fp32 1e-4, tf32 5e-3, fp16 2e-2, bf16 1e-1 rel_l2)")
    t.add_argument("--atol", type=float, help="ignore errors whose max_abs is below this")


def resolve_target(args: argparse.Namespace) -> str:
    """--target's default: the FP16 emulator, or the reference runtime when a second graph is given."""
    if args.target:
        return args.target
    return "ort:cpu:fp32" if args.target_model else "emu:fp16"


def tolerance_from_args(args: argparse.Namespace) -> Tolerance | None:
    if args.threshold is None and args.atol is None and args.metric == "rel_l2":
        return None
    target = parse_target(resolve_target(args))
    base = default_tolerance(target.precision if args.target_model is None or target.runtime == "emu" else "fp32")
    threshold = args.threshold if args.threshold is not None else (base.threshold if args.metric == base.metric else _metric_default(args.metric))
    return Tolerance(args.metric, threshold, args.atol if args.atol is not None else base.atol)


def _metric_default(metric: str) -> float:
    return {"cosine": 0.999, "snr_db": 40.0, "max_abs": 1e-3, "mean_abs": 1e-4, "mvre": 1e-2}.get(metric, 1e-4)


def load_models_and_feeds(args: argparse.Namespace) -> tuple[ModelGraph, ModelGraph | None, dict]:
    """The model, the optional --target-model, and the inputs, as every comparing command reads them."""
    graph = ModelGraph.load(args.model, check=not args.no_check)
    other = ModelGraph.load(args.target_model, check=not args.no_check) if args.target_model else None
    return graph, other, resolve_feeds(graph, args)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--report", metavar="HTML", help="write a self-contained HTML report of this run (its run directory goes beside it)")
    g.add_argument("--run", metavar="DIR", help="write the run directory (JSON results for `aligner report`) here")


def report_paths(args: argparse.Namespace) -> list[str | None]:
    """Output paths the report options will write (for the --force check before any work)."""
    return [args.report]


def emit_run(args: argparse.Namespace, kind: str, graph: ModelGraph, result: dict, trials: Path | None = None) -> None:
    """Write the run directory and render the report when --run / --report ask for them."""
    if not (args.report or args.run):
        return
    from aligner.report import write_report, write_run

    run_dir = Path(args.run) if args.run else Path(args.report).with_suffix(".run")
    write_run(run_dir, kind, graph, result, trials, force=getattr(args, "force", False))
    if args.report:
        write_report([run_dir], args.report, force=getattr(args, "force", False))
        print(f"report: {args.report} (run directory {run_dir})")


def load_torch_factory(spec: str):
    """``MODULE:FUNCTION`` -> the nn.Module it returns; clear errors for what does not import."""
    import importlib

    from aligner.errors import unknown_name_message

    module_name, _, func = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--torch {spec}: cannot import {module_name!r} ({exc}). Make it importable (PYTHONPATH) "
                         "and write MODULE:FUNCTION.") from None
    if not func or not callable(getattr(module, func, None)):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise InputError(unknown_name_message("factory", func or "(none)", names) + f" (in module {module_name!r})")
    return getattr(module, func)()
