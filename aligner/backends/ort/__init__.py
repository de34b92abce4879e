"""ONNX Runtime (``ort:cpu|cuda:fp32|tf32|fp16|bf16|int8``): the reference runtime and a deployment target.

The reference (``ort:cpu:fp32``) runs with graph optimizations off; every other ``ort`` target runs
as deployed, optimizer on, in the sandbox's child process unless ``@sandbox=0``. FP16/BF16 targets
run aligner's precision rewrite (their pins kept FP32); INT8 targets ONNX Runtime's QDQ quantization.
The runner is :class:`aligner.backends.ort.runner.OrtRunner`.
"""

from __future__ import annotations

import os
from dataclasses import replace

from aligner.backends.registry import Backend
from aligner.errors import TargetError


def _runner(graph, target, keep_io_types: bool, module):
    from aligner.backends.ort.runner import OrtRunner

    if target.is_quantized:
        from aligner.backends import int8_runner

        return int8_runner(graph, target)
    from aligner.graph.precision import built_precision, rewrite_precision

    if target.precision in ("fp32", "tf32") or built_precision(graph.model) == target.precision:  # a build runs as built
        return OrtRunner(graph.model, target, optimize=True)
    mixed = rewrite_precision(graph, target.pins, target.precision, keep_io_types)
    return OrtRunner(mixed.model, target, optimize=True)


def options(target) -> dict[str, str]:
    """ONNX Runtime's session and provider options; INT8: the quantizer's settings too."""
    from aligner.backends.base import check_options
    from aligner.backends.ort.runner import check_ort_options, known_options

    if target.is_quantized:  # the quantizer's settings, then ONNX Runtime's session options
        from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings, session_target

        QuantSettings.of(target)
        session = {k: v for k, v in known_options(target).items() if k != "fusions"}  # the QDQ model runs as ONNX Runtime runs it
        check_options(target, {**QUANT_OPTIONS, **session})
        return check_ort_options(session_target(target)) | {k: v for k, v in target.options if k in QUANT_OPTIONS}
    return check_ort_options(target)


def _fuses(target) -> bool:
    return True  # the optimizer runs on every ort target but the reference (whose runner says so itself)


def _capture_default(target):
    return "boundaries" if target.is_low_precision or target.device == "cuda" else "all"


def _segmentable(target) -> bool:
    return target.precision in ("fp32", "tf32")  # FP16/BF16: a piece's FP32 edges let the optimizer keep values FP32


def _sandboxed(target) -> bool:
    from aligner.backends.ort.sandbox import sandboxed

    return sandboxed(target)


def _workarounds(target) -> dict:
    if target.option_dict.get("graph_optimization_level") in ("basic", "disable_all"):
        return {}
    return {"--target-option graph_optimization_level=basic": target.with_options({"graph_optimization_level": "basic"})}


def _advice(target) -> str:
    tune = f"or measure the candidates with: aligner build MODEL --target {target.base} --tune"
    if target.precision == "int8" and target.device == "cuda":
        return ("ONNX Runtime's CUDA provider has no integer Conv/MatMul kernels: the Q/DQ run as kernels of their own around "
                "float compute. INT8 on NVIDIA GPUs ships through TensorRT (trt:int8); keep FP16/FP32 on ORT CUDA")
    if target.precision == "int8":
        return ("INT8 does not pay on this hardware as quantized (few integer kernels, or Q/DQ pairs around float "
                "fallbacks): try @reduce_range or another types= setting, fewer float nodes, or ship the faster precision")
    if target.device == "cuda":
        if target.is_low_precision and target.option_dict.get("cudnn_conv_algo_search", "").upper() != "HEURISTIC":
            return (f"try {target.base}@cudnn_conv_algo_search=HEURISTIC (the default EXHAUSTIVE search can pick slow "
                    f"low-precision convolutions), {tune}")
        return f"try {tune[3:]}"
    return (f"ONNX Runtime's CPU provider has few {target.precision.upper()} kernels and casts around the rest: keep FP32 "
            f"on the CPU, {tune}")


def _runnable_here(target):
    """The target, or where this machine lacks its provider (CUDA), the same precision on the CPU."""
    if target.device == "cpu":
        return target, ""
    from aligner.backends.ort.runner import providers_for

    try:
        providers_for(target)
        return target, ""
    except TargetError as exc:
        try:
            return replace(target, device="cpu", options=()), str(exc)
        except TargetError:  # a precision the CPU provider lacks (tf32)
            return replace(target, device="cpu", precision="fp32", options=()), str(exc)


def _build_check(target) -> None:
    from aligner.backends.ort.runner import session_options

    if target.is_quantized:
        from aligner.quant.quantize import session_target

        target = session_target(target)
    session_options(target, optimize=True)  # option values too (threads=x), before any work


def _tune_candidates(target, graph) -> list[dict[str, str]]:
    """The defaults first, then one change at a time (aligner.tune's docstring); an option the target fixes is left alone."""
    if target.device == "cuda":
        singles = [{"cudnn_conv_algo_search": "HEURISTIC"}, {"cudnn_conv_algo_search": "DEFAULT"}, {"prefer_nhwc": "1"},
                   {"cudnn_conv_use_max_workspace": "0"}]
        if target.is_low_precision:
            singles.append({"use_tf32": "1"})
        if all(isinstance(d, int) for i in graph.input_infos() for d in (i.shape or (None,))):
            singles.append({"enable_cuda_graph": "1"})
    else:
        threads = os.cpu_count() or 1
        singles = [{"intra_op_num_threads": "1"}] + ([{"intra_op_num_threads": str(threads)}] if threads > 1 else [])
        singles += [{"graph_optimization_level": "extended"}, {"graph_optimization_level": "basic"}]
    fixed = target.option_dict
    return [{}] + [s for s in singles if not set(s) & set(fixed)]


def _tune_check(target) -> None:
    from aligner.backends.ort.runner import providers_for

    providers_for(target)  # a missing CUDA provider is named here, not after the build


BACKEND = Backend(
    name="ort",
    title="ONNX Runtime",
    devices={"cpu": ("fp32", "fp16", "bf16", "int8"), "cuda": ("fp32", "tf32", "fp16", "bf16", "int8")},
    default_device="cpu",
    default_precision="fp32",
    runner=_runner,
    options=options,
    help="ort:cpu:fp32 (the reference: ONNX Runtime CPU, graph optimizations off), ort:cpu:fp16, "
         "ort:cuda:fp32|tf32|fp16|bf16, ort:cpu:int8 (ONNX Runtime's QDQ quantization on its integer kernels; calibration "
         "from --calib), ort:cuda:int8 (the QDQ model on the CUDA provider)",
    fuses=_fuses,
    capture_default=_capture_default,
    segmentable=_segmentable,
    captures_cheaply=True,
    optimizes=lambda target: True,
    sandboxed=_sandboxed,
    workarounds=_workarounds,
    advice=_advice,
    runnable_here=_runnable_here,
    build="onnx",
    build_check=_build_check,
    tune=_tune_candidates,
    tune_check=_tune_check,
    cpu_integer_kernels=lambda target: target.device == "cpu",
)
