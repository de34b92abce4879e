"""Backends: one Runner per target runtime, created through :func:`make_runner`.

Each runtime is one folder (``ort/``, ``emu/``, ``trt/``, ``torch/``, ``openvino/``) whose
``BACKEND`` descriptor (:mod:`aligner.backends.registry`) declares its devices, precisions,
options, runner factory and capabilities; adding a runtime is that folder plus one line in
``registry.RUNTIMES``. Heavy or optional runtimes (torch, tensorrt, onnxruntime-gpu, openvino)
are imported inside the hooks that need them, never at ``import aligner``.
"""

from __future__ import annotations

from collections.abc import Iterable

from aligner.backends.base import InputInfo, Runner
from aligner.backends.registry import Backend, backend, backend_of, backends
from aligner.backends.target import REFERENCE, Target, parse_target, valid_targets
from aligner.errors import TargetError
from aligner.graph.model import ModelGraph


def int8_runner(graph: ModelGraph, target: Target) -> Runner:
    """The runner of an INT8 target on any runtime: its QDQ model (quantized here, or as built or
    quantized elsewhere) on the target's runtime."""
    from aligner.graph.precision import built_precision
    from aligner.quant.runner import Int8Runner, prequantized, qdq_runner, refuse_pins

    if prequantized(graph.model):  # an INT8 build (its pins are what it was built with), or a QDQ model made elsewhere: as it is
        if built_precision(graph.model) != "int8":
            refuse_pins(target, graph)
        return qdq_runner(graph.model, target, graph.path)
    return Int8Runner(graph, target)


def check_target(target: Target | str) -> Target:
    """``target`` parsed and its runtime options checked, before long work (make_runner checks again):
    an unknown option is a TargetError listing the known ones."""
    target = Target.parse(target)
    backend_of(target).options(target)
    return target


def make_runner(graph: ModelGraph, target: Target | str, fp32_nodes: Iterable[str] = (), keep_io_types: bool = True,
                *, module=None) -> Runner:
    """A runner for ``graph`` on ``target``; the target's pins (plus ``fp32_nodes``) stay FP32 and its
    runtime options are checked here (an unknown one is a TargetError listing the known ones).
    ``torch:*`` targets run ``module`` (an ``nn.Module``) with the graph's input and output names."""
    target = Target.parse(target, pins=fp32_nodes)
    if module is not None and backend_of(target).runs_onnx:
        raise TargetError(f"Target {target} runs the ONNX graph; a PyTorch module is only for torch:* targets.")
    runtime = backend_of(target)
    runtime.options(target)
    if target.plan is not None:  # the model (and calibration) the plan was verified with, or a PlanError
        from aligner.backends.replay import check_replay

        check_replay(graph, target)
    return runtime.runner(graph, target, keep_io_types, module)


def reference_runner(graph: ModelGraph, target: Target | str = REFERENCE) -> Runner:
    """The reference: ONNX Runtime with graph optimizations off (fidelity over speed)."""
    from aligner.backends.ort.runner import OrtRunner

    target = Target.parse(target)
    if target.runtime == "ort" and target.precision == "fp32" and not target.pins:
        return OrtRunner(graph.model, target, optimize=False, label=f"reference {target}")
    return make_runner(graph, target)


__all__ = ["Backend", "InputInfo", "Runner", "backend", "backend_of", "backends", "int8_runner", "Target", "check_target", "make_runner", "parse_target", "reference_runner", "valid_targets"]
