"""Backends: one Runner per target runtime, created through :func:`make_runner`.

Heavy or optional runtimes (torch, tensorrt, onnxruntime-gpu) are imported inside the factory
that needs them, never at ``import aligner``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aligner.backends.base import Runner
from aligner.backends.target import Target, parse_target, valid_targets
from aligner.graph.model import ModelGraph


def _ort(graph: ModelGraph, target: Target, fp32_nodes: Iterable[str], keep_io_types: bool) -> Runner:
    from aligner.backends.onnxruntime import OrtRunner

    if target.precision in ("fp32", "tf32"):
        return OrtRunner(graph.model, target, optimize=True)
    from aligner.graph.precision import rewrite_precision

    mixed = rewrite_precision(graph, fp32_nodes, target.precision, keep_io_types)
    return OrtRunner(mixed.model, target, optimize=True)


def _emu(graph: ModelGraph, target: Target, fp32_nodes: Iterable[str], keep_io_types: bool) -> Runner:
    from aligner.backends.emulate import emulate_model
    from aligner.backends.onnxruntime import OrtRunner

    emulated = emulate_model(graph, fp32_nodes, target.precision, keep_io_types)
    return OrtRunner(emulated.model, target, optimize=False)


def _trt(graph: ModelGraph, target: Target, fp32_nodes: Iterable[str], keep_io_types: bool) -> Runner:
    from aligner.backends.trt_runner import TrtRunner

    return TrtRunner(graph, target, list(fp32_nodes))


RUNNERS: dict[str, Callable[[ModelGraph, Target, Iterable[str], bool], Runner]] = {"ort": _ort, "emu": _emu, "trt": _trt}


def make_runner(graph: ModelGraph, target: Target | str, fp32_nodes: Iterable[str] = (), keep_io_types: bool = True) -> Runner:
    """A runner for ``graph`` on ``target``; ``fp32_nodes`` stay FP32 in low-precision targets."""
    target = parse_target(target) if isinstance(target, str) else target
    return RUNNERS[target.runtime](graph, target, fp32_nodes, keep_io_types)


def reference_runner(graph: ModelGraph, target: Target | str = "ort:cpu:fp32") -> Runner:
    """The reference: ONNX Runtime with graph optimizations off (fidelity over speed)."""
    from aligner.backends.onnxruntime import OrtRunner

    target = parse_target(target) if isinstance(target, str) else target
    if target.runtime == "ort" and target.precision == "fp32":
        return OrtRunner(graph.model, target, optimize=False, label=f"reference {target}")
    return make_runner(graph, target)


__all__ = ["Runner", "Target", "make_runner", "parse_target", "reference_runner", "valid_targets"]
