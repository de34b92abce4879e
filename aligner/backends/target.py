"""Target specs: ``runtime[:device][:precision]``, e.g. ``ort:cpu:fp32``, ``emu:fp16``."""

from __future__ import annotations

from dataclasses import dataclass

from aligner.errors import TargetError

# runtime -> device -> precisions that exist in this version
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "ort": {"cpu": ("fp32", "fp16", "bf16"), "cuda": ("fp32", "tf32", "fp16", "bf16")},
    "emu": {"cpu": ("fp16", "bf16")},
    "trt": {"cuda": ("fp32", "fp16", "bf16")},  # strongly typed from aligner's rewrite (TensorRT 10/11, TensorRT-RTX)
}
DEFAULT_DEVICE = {"ort": "cpu", "emu": "cpu", "trt": "cuda"}
DEFAULT_PRECISION = {"ort": "fp32", "emu": "fp16", "trt": "fp16"}


@dataclass(frozen=True)
class Target:
    runtime: str
    device: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime}:{self.device}:{self.precision}" if self.runtime not in ("emu", "trt") else f"{self.runtime}:{self.precision}"

    @property
    def is_low_precision(self) -> bool:
        return self.precision in ("fp16", "bf16")


def valid_targets() -> list[str]:
    return [str(Target(r, d, p)) for r, devs in SUPPORTED.items() for d, ps in devs.items() for p in ps]


def parse_target(spec: str) -> Target:
    """Parse a target spec; unknown specs list the valid ones."""
    parts = [p.strip().lower() for p in spec.split(":") if p.strip()]
    if not parts or parts[0] not in SUPPORTED:
        raise TargetError(_unknown(spec))
    runtime = parts[0]
    rest = parts[1:]
    devices = SUPPORTED[runtime]
    device = rest.pop(0) if rest and rest[0] in devices else DEFAULT_DEVICE[runtime]
    precision = rest.pop(0) if rest else DEFAULT_PRECISION[runtime]
    if rest or precision not in devices[device]:
        raise TargetError(_unknown(spec))
    return Target(runtime, device, precision)


def _unknown(spec: str) -> str:
    later = "torch:* targets are for aligner compare --torch and aligner bench --torch"
    return f"Unknown target {spec!r}. Valid targets: {', '.join(valid_targets())} ({later})."
