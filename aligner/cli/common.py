"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import load_inputs, make_inputs, parse_input_shapes, save_inputs, validate_feeds


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to the .onnx model (external-data and >2 GiB models work)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX checker when loading")


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
