"""Backends: one Runner per target runtime, created through :func:`make_runner`.

``RUNNERS`` maps a target's runtime to the factory of its runner; adding a runtime is one module
plus one entry. Heavy or optional runtimes (torch, tensorrt, onnxruntime-gpu) are imported inside
the factory that needs them, never at ``import aligner``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aligner.backends.base import InputInfo, Runner, check_options
from aligner.backends.target import REFERENCE, Target, parse_target, valid_targets
from aligner.errors import TargetError
from aligner.graph.model import ModelGraph


def _int8(graph: ModelGraph, target: Target) -> Runner:
    from aligner.graph.precision import built_precision
    from aligner.quant.runner import Int8Runner, prequantized, qdq_runner, refuse_pins

    if prequantized(graph.model):  # an INT8 build (its pins are what it was built with), or a QDQ model made elsewhere: as it is
        if built_precision(graph.model) != "int8":
            refuse_pins(target, graph)
        return qdq_runner(graph.model, target, graph.path)
    return Int8Runner(graph, target)


def _ort(graph: ModelGraph, target: Target, keep_io_types: bool, module) -> Runner:
    from aligner.backends.onnxruntime import OrtRunner

    if target.is_quantized:
        return _int8(graph, target)

    from aligner.graph.precision import built_precision, rewrite_precision

    if target.precision in ("fp32", "tf32") or built_precision(graph.model) == target.precision:  # a build runs as built
        return OrtRunner(graph.model, target, optimize=True)

    mixed = rewrite_precision(graph, target.pins, target.precision, keep_io_types)
    return OrtRunner(mixed.model, target, optimize=True)


def _emu(graph: ModelGraph, target: Target, keep_io_types: bool, module) -> Runner:
    from aligner.backends.emulate import emulate_model
    from aligner.backends.onnxruntime import OrtRunner

    if target.is_quantized:
        return _int8(graph, target)
    if "fusions" in target.option_dict:
        from aligner.backends.emulate_fused import FusedEmuRunner

        return FusedEmuRunner(graph, target, keep_io_types)
    emulated = emulate_model(graph, target.pins, target.precision, keep_io_types)
    return OrtRunner(emulated.model, target, optimize=False)


def _trt(graph: ModelGraph, target: Target, keep_io_types: bool, module) -> Runner:
    from aligner.backends.trt_runner import TrtRunner

    if target.is_quantized:
        return _int8(graph, target)
    return TrtRunner(graph, target)


def _torch(graph: ModelGraph, target: Target, keep_io_types: bool, module) -> Runner:
    if module is None:
        raise TargetError(f"Target {target} runs a PyTorch module, not an ONNX graph: pass the module "
                          "(make_runner(graph, target, module=model); CLI: --torch MODULE:FUNCTION). The ONNX graph "
                          "names its inputs and outputs.")
    from aligner.backends.base import describe_model_inputs
    from aligner.backends.torch import TorchRunner

    return TorchRunner(module, target, graph.input_names, graph.output_names, describe_model_inputs(graph.model))


# runtime -> factory(graph, target, keep_io_types, module)
RUNNERS: dict[str, Callable[..., Runner]] = {"ort": _ort, "emu": _emu, "trt": _trt, "torch": _torch}


def _ort_options(target: Target) -> dict[str, str]:
    from aligner.backends.onnxruntime import check_ort_options

    if target.is_quantized:  # the quantizer's settings, then ONNX Runtime's session options
        from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings, session_target

        QuantSettings.of(target)
        session = {k: v for k, v in _session_options(target).items() if k != "fusions"}  # the QDQ model runs as ONNX Runtime runs it
        check_options(target, {**QUANT_OPTIONS, **session})
        return check_ort_options(session_target(target)) | {k: v for k, v in target.options if k in QUANT_OPTIONS}
    return check_ort_options(target)


def _session_options(target: Target) -> dict[str, str]:
    from aligner.backends.onnxruntime import known_options

    return known_options(target)


def _trt_options(target: Target) -> dict[str, str]:
    from aligner.backends.tensorrt import TRT_OPTIONS

    if target.is_quantized:  # the quantizer's settings, then TensorRT's builder settings
        from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings

        QuantSettings.of(target)
        return check_options(target, {**QUANT_OPTIONS, **TRT_OPTIONS})
    return check_options(target, TRT_OPTIONS)


def _torch_options(target: Target) -> dict[str, str]:
    from aligner.backends.torch import TORCH_OPTIONS

    return check_options(target, TORCH_OPTIONS)


# runtime -> the check of a target's runtime options (each runtime documents its names)
OPTIONS: dict[str, Callable[[Target], dict[str, str]]] = {"ort": _ort_options, "emu": _ort_options, "trt": _trt_options,
                                                          "torch": _torch_options}


def check_target(target: Target | str) -> Target:
    """``target`` parsed and its runtime options checked, before long work (make_runner checks again):
    an unknown option is a TargetError listing the known ones."""
    target = Target.parse(target)
    OPTIONS[target.runtime](target)
    return target


def make_runner(graph: ModelGraph, target: Target | str, fp32_nodes: Iterable[str] = (), keep_io_types: bool = True,
                *, module=None) -> Runner:
    """A runner for ``graph`` on ``target``; the target's pins (plus ``fp32_nodes``) stay FP32 and its
    runtime options are checked here (an unknown one is a TargetError listing the known ones).
    ``torch:*`` targets run ``module`` (an ``nn.Module``) with the graph's input and output names."""
    target = Target.parse(target, pins=fp32_nodes)
    if module is not None and target.runtime != "torch":
        raise TargetError(f"Target {target} runs the ONNX graph; a PyTorch module is only for torch:* targets.")
    OPTIONS[target.runtime](target)
    if target.plan is not None:  # the model (and calibration) the plan was verified with, or a PlanError
        from aligner.backends.replay import check_replay

        check_replay(graph, target)
    return RUNNERS[target.runtime](graph, target, keep_io_types, module)


def reference_runner(graph: ModelGraph, target: Target | str = REFERENCE) -> Runner:
    """The reference: ONNX Runtime with graph optimizations off (fidelity over speed)."""
    from aligner.backends.onnxruntime import OrtRunner

    target = Target.parse(target)
    if target.runtime == "ort" and target.precision == "fp32" and not target.pins:
        return OrtRunner(graph.model, target, optimize=False, label=f"reference {target}")
    return make_runner(graph, target)


__all__ = ["InputInfo", "OPTIONS", "RUNNERS", "Runner", "Target", "check_target", "make_runner", "parse_target", "reference_runner", "valid_targets"]
