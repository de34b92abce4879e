"""OpenVINO (``ov:cpu:fp32|fp16|bf16|int8``; the ``openvino`` extra): Intel's runtime on this machine's CPU.

It runs real BF16 kernels where the CPU has native BF16 (AVX-512 BF16, AMX) and real INT8 kernels
on QDQ models (ONNX Runtime's quantizer makes them for ``ov:cpu:int8``, or give a QDQ model made by
NNCF or any quantizer), and it fuses: comparisons capture the tensors its executed layers write
(the runtime model's ``originalLayersNames``) and say what precision each layer really ran in.
A precision the CPU cannot run (bf16 without native BF16) is not refused by OpenVINO: it runs f32
instead, so aligner refuses the target (every verdict would be FP32's) unless ``@allow_f32=1``. The runner is :class:`aligner.backends.openvino.runner.OvRunner`.
"""

from __future__ import annotations

from aligner.backends.registry import Backend


def _runner(graph, target, keep_io_types: bool, module):
    if target.is_quantized:
        from aligner.backends import int8_runner

        return int8_runner(graph, target)
    from aligner.backends.openvino.runner import OvRunner

    return OvRunner(graph.model, target)  # pins: OpenVINO's own keep-FP32 mark on their operations (OvRunner)


def _qdq_runner(qdq, target, path=None, label=None):
    from aligner.backends.openvino.runner import OvRunner
    from aligner.quant.quantize import session_target

    return OvRunner(qdq, session_target(target), label=label or str(target))  # the runtime's options, not the quantizer's


def _options(target) -> dict[str, str]:
    from aligner.backends.openvino.runner import OV_OPTIONS, ov_options

    if target.is_quantized:  # the quantizer's settings (ONNX Runtime's quantizer makes the QDQ model), then OpenVINO's
        from aligner.backends.base import check_options
        from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings, session_target

        QuantSettings.of(target)
        check_options(target, {**QUANT_OPTIONS, **OV_OPTIONS})
        return ov_options(session_target(target)) | {k: v for k, v in target.options if k in QUANT_OPTIONS}
    return ov_options(target)


BACKEND = Backend(
    name="ov",
    title="OpenVINO",
    devices={"cpu": ("fp32", "fp16", "bf16", "int8")},
    default_device="cpu",
    default_precision="fp32",
    runner=_runner,
    qdq_runner=_qdq_runner,
    options=_options,
    help="ov:cpu:fp32|fp16|bf16 (OpenVINO's CPU plugin with that inference precision hint: real BF16 kernels where the CPU "
         "has native BF16; refused where OpenVINO would run f32 instead, unless @allow_f32=1), ov:cpu:int8 (the QDQ model on "
         "OpenVINO's integer kernels)",
    not_built="OpenVINO compiles the ONNX model itself when it loads it, so ship the .onnx and compile it with the same "
              "properties (core.compile_model(path, 'CPU', {'INFERENCE_PRECISION_HINT': 'bf16'}))",
    fuses=lambda target: True,
    # its u8s8 kernels saturate int16 sums on CPUs without VNNI as ONNX Runtime's do (measured on the example detector,
    # AVX2: 142 of 283 tensors diverged from the first Conv on with 8-bit weights; reduce_range=1 is the default there too)
    cpu_integer_kernels=lambda target: True,
    capture_default=lambda target: "boundaries",
    advice=lambda target: ("OpenVINO runs a precision only where the CPU has its kernels (BF16: AVX-512 BF16 or AMX); "
                           "try @performance_hint=throughput for batches, or ship the faster precision"),
)
