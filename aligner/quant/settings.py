"""An INT8 target's quantizer settings: the runtime options that choose them, their defaults per
runtime and CPU (:class:`QuantSettings`), and the targets the QDQ model then runs under."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from aligner.backends.base import choice_option
from aligner.backends.registry import backend_of
from aligner.backends.target import Target
from aligner.errors import TargetError

log = logging.getLogger(__name__)

# Runtime options of ort:cpu:int8 / emu:int8 (besides ONNX Runtime's session options), by documented name.
QUANT_OPTIONS = {
    "calib": "calibration inputs: an .npz or a folder of .npz files (the CLI's --calib); without it the command's inputs, with a warning",
    "calibrate": "minmax|entropy|percentile: ONNX Runtime's calibration method (default minmax)",
    "percentile": "percentile of calibrate=percentile (default 99.999)",
    "types": "u8s8|s8s8|u8u8: activation then weight integer types (default u8s8, the fast one on x86 CPUs)",
    "reduce_range": "0|1: 7-bit weights (default 0; 1 on ort:cpu with u8s8/s8s8 where this CPU has no VNNI: ONNX Runtime's "
                    "integer kernels accumulate pairs in int16 there and saturate, as its documentation warns)",
    "per_channel": "1|0: per-output-channel weight scales (default 1)",
    "symmetric": "0|1: symmetric activation ranges, zero point 0 (default 0; trt:int8 always, the only INT8 TensorRT takes)",
    "quantize_bias": "1|0: biases as int32 DQ (default 1; trt:int8 always 0: TensorRT takes no int32 dequantization and adds biases in float)",
    "fallback": "fp32|fp16: the precision of what is not quantized, plan nodes included (default fp32; fp16 where the runtime "
                "runs FP16: ort:cuda, trt; the Q/DQ and the quantized nodes between them stay as quantized)",
}
FALLBACK = ("fp32", "fp16")
CALIBRATE = ("minmax", "entropy", "percentile")
TYPES = ("u8s8", "s8s8", "u8u8")


def vnni_missing() -> bool:
    """True on an x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI or AMX): ONNX Runtime's u8s8/s8s8 integer
    kernels then multiply-add pairs into int16 (VPMADDUBSW) and saturate; 7-bit weights avoid it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
        return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
    except OSError:  # no /proc (Windows, macOS): numpy's own CPU feature table
        from numpy._core._multiarray_umath import __cpu_features__

        return not __cpu_features__.get("AVX512VNNI", False)


def _default_reduce_range(target: Target, types: str) -> str:
    """reduce_range's default: 1 where the integer kernels run on this CPU and would saturate, else 0."""
    if not backend_of(target).cpu_integer_kernels(target) or types == "u8u8" or not vnni_missing():
        return "0"
    if target.runtime not in _said_saturation:
        _said_saturation.append(target.runtime)
        log.warning("This CPU has no VNNI: %s's %s integer kernels saturate their int16 sums here, so %s quantizes weights to 7 bits "
                    "(reduce_range=1, ONNX Runtime's advice for such CPUs). Pass @reduce_range=0 to see the saturation.",
                    backend_of(target).title, types, target.base)
    return "1"


_said_saturation: list[str] = []  # runtimes warned about


@dataclass(frozen=True)
class QuantSettings:
    """ONNX Runtime quantizer settings of one INT8 target (recorded in results and plans)."""

    calibrate: str = "minmax"
    types: str = "u8s8"
    reduce_range: bool = False
    per_channel: bool = True
    percentile: float = 99.999
    symmetric: bool = False  # activations: zero point 0 (weights are symmetric in every setting)
    fallback: str = "fp32"  # what is not quantized runs in this precision (mixed INT8 + FP16 with "fp16")
    quantize_bias: bool = True  # biases as int32 Q/DQ (ONNX Runtime's default); TensorRT takes float biases only

    @classmethod
    def of(cls, target: Target) -> "QuantSettings":
        """The settings a target's options give (defaults for the rest); a bad value is a TargetError."""
        o, runtime = target.option_dict, backend_of(target)
        defaults = runtime.int8_defaults  # what the runtime's INT8 kernels take (TensorRT: s8s8 symmetric, float biases)
        calibrate = choice_option(target, "calibrate", o.get("calibrate", "minmax"), CALIBRATE)
        types = choice_option(target, "types", o.get("types", defaults.get("types", "u8s8")), TYPES)
        flags = {k: choice_option(target, k, o.get(k, defaults.get(k, d)), ("0", "1")) == "1"
                 for k, d in (("reduce_range", _default_reduce_range(target, types)), ("per_channel", "1"), ("symmetric", "0"),
                              ("quantize_bias", "1"))}
        given = {"types": types, **{k: str(int(v)) for k, v in flags.items()}}
        if any(given[k] != defaults[k] for k in runtime.int8_forced if k in defaults and k != "reduce_range"):
            forced = ", ".join(f"{k}={defaults[k]}" for k in runtime.int8_forced if k in defaults and k != "reduce_range")
            raise TargetError(f"Target {target}: {runtime.title} takes {runtime.int8_takes or 'INT8'} only ({forced}: the defaults "
                              f"of {target.base}); leave those options out.")
        try:
            percentile = float(o.get("percentile", "99.999"))
        except ValueError:
            percentile = -1.0
        if not 0 < percentile <= 100:
            raise TargetError(f"Target {target}: percentile={o.get('percentile')!r}; give a number in (0, 100], e.g. 99.99.")
        fallback = choice_option(target, "fallback", o.get("fallback", "fp32"), FALLBACK)
        if fallback != "fp32" and runtime.cpu_integer_kernels(target):
            raise TargetError(f"Target {target}: fallback={fallback} needs a runtime that computes in {fallback}: ONNX Runtime's CPU "
                              f"provider runs most FP16 ops in FP32. Use ort:cuda:int8 or trt:int8, or emu:int8@fallback={fallback} "
                              "to emulate it here.")
        return cls(calibrate, types, flags["reduce_range"], flags["per_channel"], percentile, flags["symmetric"], fallback,
                   flags["quantize_bias"])

    def options(self) -> dict[str, str]:
        """These settings as target options (``target.with_options(settings.options())``)."""
        return {"calibrate": self.calibrate, "types": self.types, "reduce_range": str(int(self.reduce_range)),
                "per_channel": str(int(self.per_channel)), **({"percentile": f"{self.percentile:g}"} if self.calibrate == "percentile" else {}),
                **({"symmetric": "1"} if self.symmetric else {}), **({"fallback": self.fallback} if self.fallback != "fp32" else {}),
                **({} if self.quantize_bias else {"quantize_bias": "0"})}

    def describe(self) -> str:
        return (f"{self.calibrate}{f' {self.percentile:g}' if self.calibrate == 'percentile' else ''} {self.types}"
                f"{' reduce_range' if self.reduce_range else ''}{' per-channel' if self.per_channel else ' per-tensor'}"
                f"{' symmetric' if self.symmetric else ''}{f', {self.fallback} fallback' if self.fallback != 'fp32' else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def engine_target(target: Target) -> Target:
    """The TensorRT target a QDQ model of ``trt:int8`` is built on: FP32 types (the Q/DQ say where it
    runs INT8), TensorRT's builder settings and the capture policy, not the quantizer's settings."""
    from aligner.backends.trt.engine import TRT_OPTIONS

    options = {k: v for k, v in target.options if k in TRT_OPTIONS or k == "capture"}
    return Target("trt", "cuda", "fp32", options=tuple(sorted(options.items())))


def session_target(target: Target) -> Target:
    """The target ONNX Runtime sessions of the QDQ model run under: the session options only."""
    options = {k: v for k, v in target.options if k not in QUANT_OPTIONS}
    return Target(target.runtime, target.device, target.precision, options=tuple(sorted(options.items())))


__all__ = ["CALIBRATE", "FALLBACK", "QUANT_OPTIONS", "QuantSettings", "TYPES", "engine_target", "session_target", "vnni_missing"]
