"""TensorRT (``trt:fp32|fp16|bf16|int8``; TensorRT 10/11 or TensorRT-RTX), strongly typed from aligner's rewrite.

Engines are built by :mod:`aligner.backends.trt.engine` and run by :class:`aligner.backends.trt.runner.TrtRunner`;
comparisons capture the tensors its engine's layers write (their layer information), since marking
another tensor an output undoes a fusion. INT8 is signed and symmetric (the only INT8 TensorRT takes).
"""

from __future__ import annotations

from aligner.backends.registry import Backend

FORCED_INT8 = ("types", "symmetric", "quantize_bias", "reduce_range")  # s8s8 symmetric, float biases, whatever a plan says


def _runner(graph, target, keep_io_types: bool, module):
    if target.is_quantized:
        from aligner.backends import int8_runner

        return int8_runner(graph, target)
    from aligner.backends.trt.runner import TrtRunner

    return TrtRunner(graph, target)


def _qdq_runner(qdq, target, path=None, label=None):
    """A QDQ model on TensorRT: the Q/DQ define where it runs INT8, built strongly typed."""
    from aligner.backends.trt.runner import TrtRunner
    from aligner.graph.model import ModelGraph
    from aligner.quant.quantize import engine_target
    from aligner.quant.runner import check_tensorrt_qdq

    check_tensorrt_qdq(qdq, target)
    inner = TrtRunner(ModelGraph(qdq, path), engine_target(target))
    inner.label = label or str(target)
    return inner


def _options(target) -> dict[str, str]:
    from aligner.backends.base import check_options
    from aligner.backends.trt.engine import TRT_OPTIONS

    if target.is_quantized:  # the quantizer's settings, then TensorRT's builder settings
        from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings

        QuantSettings.of(target)
        return check_options(target, {**QUANT_OPTIONS, **TRT_OPTIONS})
    return check_options(target, TRT_OPTIONS)


def _build_check(target) -> None:
    from aligner.backends.trt.engine import load_tensorrt

    load_tensorrt()


BACKEND = Backend(
    name="trt",
    title="TensorRT",
    devices={"cuda": ("fp32", "fp16", "bf16", "int8")},
    default_device="cuda",
    default_precision="fp16",
    short=True,
    runner=_runner,
    qdq_runner=_qdq_runner,
    options=_options,
    help="trt:fp32|fp16|bf16 (TensorRT, strongly typed), trt:int8 (TensorRT: s8s8, symmetric, float biases)",
    fuses=lambda target: True,
    capture_default=lambda target: "boundaries",
    advice=lambda target: "try @builder_optimization_level=5 (a longer tactic search), and check the plan's Casts between FP32 islands",
    build="engine",
    build_check=_build_check,
    not_tuned="TensorRT builds record their builder settings (@builder_optimization_level=..., timing_cache, workspace_mb) as given",
    int8_defaults={"types": "s8s8", "symmetric": "1", "quantize_bias": "0", "reduce_range": "0"},
    int8_takes="signed, symmetric INT8 with float biases",
    int8_forced=FORCED_INT8,
)
