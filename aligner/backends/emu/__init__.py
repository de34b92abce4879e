"""The emulator (``emu:fp16|bf16|int8``): what a low-precision GPU build computes, on any CPU.

FP16/BF16: every stored tensor rounded to the precision (its overflow and underflow included) on
ONNX Runtime CPU, deterministic (:mod:`aligner.backends.emu.emulate`); ``@fusions=ort`` emulates the
kernels ONNX Runtime fuses (:mod:`aligner.backends.emu.fused`). INT8: the QDQ model with Q/DQ
evaluated in float (quantization's error without the integer kernels'). Its speed means nothing:
a build or a timing of an ``emu`` target uses ONNX Runtime CPU in the same precision.
"""

from __future__ import annotations

from dataclasses import replace

from aligner.backends.registry import Backend


def _runner(graph, target, keep_io_types: bool, module):
    from aligner.backends.emu.emulate import emulate_model
    from aligner.backends.ort.runner import OrtRunner

    if target.is_quantized:
        from aligner.backends import int8_runner

        return int8_runner(graph, target)
    if "fusions" in target.option_dict:
        from aligner.backends.emu.fused import FusedEmuRunner

        return FusedEmuRunner(graph, target, keep_io_types)
    emulated = emulate_model(graph, target.pins, target.precision, keep_io_types)
    return OrtRunner(emulated.model, target, optimize=False)


def _options(target) -> dict[str, str]:
    from aligner.backends.ort import options

    return options(target)  # ONNX Runtime CPU runs it: its options (and INT8's quantizer settings)


def _deploys_as(target):
    """ONNX Runtime CPU in the same precision (the emulator models a GPU build; its speed means nothing)."""
    from aligner.backends.target import Target

    return replace(Target.parse(f"ort:cpu:{target.precision}"), options=target.options if target.is_quantized else ())


BACKEND = Backend(
    name="emu",
    title="the FP16/BF16/INT8 emulator",
    devices={"cpu": ("fp16", "bf16", "int8")},
    default_device="cpu",
    default_precision="fp16",
    short=True,
    runner=_runner,
    options=_options,
    optimizes=lambda target: False,  # ONNX Runtime with its optimizer off: every stored tensor as emulated, Q/DQ in float
    help="emu:fp16|bf16 (the FP16/BF16 emulator on ONNX Runtime CPU: the overflow/underflow of a GPU build, deterministic, "
         "on any machine), emu:int8 (the QDQ model with Q/DQ evaluated in float: quantization error without the kernels')",
    timed=False,
    fuses=lambda target: "fusions" in target.option_dict,
    capture_default=lambda target: "boundaries" if "fusions" in target.option_dict else "all",
    segmentable=lambda target: target.precision in ("fp16", "bf16"),  # rounding each stored tensor: FP32 carries of rounded values are exact
    captures_cheaply=True,
    deploys_as=_deploys_as,
    int8_emulated=True,
)
