"""The accuracy check of an INT8 build (``aligner build --target ort:cpu:int8+plan.json``).

The build's outputs are judged against FP32 by :func:`aligner.build.check_build` under the one
verdict rule (:class:`~aligner.compare.tolerance.Tolerance`; each output as compare judges it):
the rule given, else the plan's recorded rule, else INT8's default (:func:`aligner.build.build_rule`).
This module says where that runs: on ``ort:cpu`` on the integer kernels themselves; elsewhere (a
GPU is not needed to build) with Q/DQ evaluated in float, ``emu:int8``, with the target's
quantizer settings.
"""

from __future__ import annotations

from aligner.backends.target import Target


def checked_on(target: Target) -> Target:
    """Where an INT8 build is checked: on ONNX Runtime's CPU integer kernels where it runs on them
    (``ort:cpu``); elsewhere :func:`emulated`."""
    from aligner.backends.registry import backend_of

    return target if backend_of(target).cpu_integer_kernels(target) else emulated(target)


def emulated(target: Target) -> Target:
    """``emu:int8`` quantizing as ``target`` does: its calibration and settings written out (a
    trt:int8 default such as s8s8 symmetric is not emu's), no runtime or builder options."""
    from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings

    options = {k: v for k, v in target.options if k in QUANT_OPTIONS} | QuantSettings.of(target).options()
    return Target("emu", "cpu", "int8", target.pins, target.plan, tuple(sorted(options.items())))


__all__ = ["checked_on", "emulated"]
