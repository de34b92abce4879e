"""Targets: where and how a model runs, written once and meaning the same in every command.

``runtime[:device][:precision][+PINS][@OPTIONS]``::

    ort:cpu:fp32                       the default reference (ONNX Runtime CPU, optimizations off)
    ort:cuda:fp16+plan.json            FP16 on ONNX Runtime CUDA, the plan's nodes kept FP32
    emu:fp16                           the FP16 emulator (ONNX Runtime CPU)
    trt:fp16                           TensorRT, strongly typed from aligner's rewrite
    torch:cuda:bf16                    PyTorch eager
    ort:cpu:fp16+fp32=/a/Pow,/a/Sqrt   explicit FP32 nodes
    ort:cpu:int8@calib=calib/          ONNX Runtime's QDQ quantization on its integer kernels (emu:int8: Q/DQ
                                       evaluated in float); pins are the nodes kept in float (not quantized)
    ort:cuda:int8, trt:int8            the same QDQ model on ONNX Runtime CUDA / TensorRT (trt:int8 quantizes
                                       signed and symmetric, the only INT8 TensorRT takes)
    ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC   runtime options

``+plan`` (no path) means "the plan given separately" (``--plan``). ``str()`` gives back a spec
that parses to the same value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aligner.backends.registry import backend, backends
from aligner.errors import InputError, PlanError, TargetError

_OPTION = re.compile(r"^[A-Za-z_][\w.]*=[^,=]*(,[A-Za-z_][\w.]*=[^,=]*)*$")


@dataclass(frozen=True)
class Target:
    """One runtime, device and precision, the nodes kept FP32 there, and the runtime options."""

    runtime: str
    device: str
    precision: str
    pins: tuple[str, ...] = ()  # nodes kept in FP32 (fp16/bf16 targets) or in float, not quantized (int8)
    plan: str | None = None  # the plan file the pins came from, when they did
    options: tuple[tuple[str, str], ...] = field(default=())  # runtime options, sorted by key

    def __post_init__(self):
        runtime = backends().get(self.runtime)
        devices = runtime.devices if runtime is not None else None
        if devices is None or self.device not in devices or self.precision not in devices[self.device]:
            raise TargetError(_unknown(f"{self.runtime}:{self.device}:{self.precision}"))
        if self.pins and self.precision not in ("fp16", "bf16", "int8"):
            raise TargetError(f"Target {self.base}: FP32 pins only apply to fp16/bf16/int8 targets ({len(self.pins)} given).")

    @classmethod
    def parse(cls, spec: "str | Target", pins: Iterable[str] = (), plan: str | Path | None = None,
              options: Mapping[str, str] | None = None) -> "Target":
        """Parse ``spec``; ``pins`` (``--fp32-nodes``) and ``options`` (``--target-option``) extend
        what the spec says; ``plan`` (``--plan``) is the file a ``+plan`` suffix refers to."""
        target = spec if isinstance(spec, Target) else _parse(spec, plan)
        pins = list(pins)
        if pins:
            target = target.with_pins([*target.pins, *pins])
        if options:
            target = target.with_options(options)
        if target.plan is not None and target.is_quantized and not isinstance(spec, Target):
            _check_plan_settings(target)
        return target

    @property
    def base(self) -> str:
        """``runtime:device:precision`` (short form for single-device runtimes), without pins or options."""
        return f"{self.runtime}:{self.precision}" if backend(self.runtime).short else f"{self.runtime}:{self.device}:{self.precision}"

    def __str__(self) -> str:
        text = self.base
        if self.plan is not None:
            text += f"+{self.plan}"
        elif self.pins:
            text += "+fp32=" + ",".join(self.pins)
        if self.options:
            text += "@" + ",".join(f"{k}={v}" for k, v in self.options)
        return text

    @property
    def is_low_precision(self) -> bool:
        return self.precision in ("fp16", "bf16", "autocast")

    @property
    def is_quantized(self) -> bool:
        """INT8: the model is quantized by ONNX Runtime's quantizer (QDQ); pins stay in float."""
        return self.precision == "int8"

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def with_pins(self, pins: Iterable[str]) -> "Target":
        """The same target with exactly these FP32 nodes (the plan file no longer describes them)."""
        pins = tuple(dict.fromkeys(p for p in pins if p))
        return replace(self, pins=pins, plan=self.plan if pins == self.pins else None)

    def with_options(self, options: Mapping[str, str]) -> "Target":
        merged = {**self.option_dict, **{str(k): str(v) for k, v in options.items()}}
        return replace(self, options=tuple(sorted(merged.items())))

    def to_dict(self) -> dict:
        return {"spec": str(self), "runtime": self.runtime, "device": self.device, "precision": self.precision,
                "fp32_nodes": list(self.pins), "plan": self.plan, "options": self.option_dict}


REFERENCE = "ort:cpu:fp32"
DEFAULT_TARGET = "emu:fp16"  # what every command checks when no --target is given: the FP16 emulator, any machine


def parse_target(spec: "str | Target") -> Target:
    """Parse a target spec; unknown specs list the valid ones."""
    return Target.parse(spec)


def valid_targets() -> list[str]:
    return [Target(r, d, p).base for r, b in backends().items() for d, ps in b.devices.items() for p in ps]


def split_targets(text: str) -> list[str]:
    """A comma-separated target list: a comma starts a new target only before a runtime's name, so
    ``ort:cuda:fp16@a=1,b=2,emu:fp16`` and ``ort:cpu:fp16+fp32=/x/Pow,/x/Sqrt`` split as meant."""
    starts = re.compile(r"^\s*(" + "|".join(map(re.escape, backends())) + r")(?=$|[:+@\s])")
    targets: list[str] = []
    for piece in text.split(","):
        if targets and not starts.match(piece):
            targets[-1] += "," + piece
        else:
            targets.append(piece.strip())
    if not targets or not all(targets):
        raise InputError(f"Targets {text!r}: write comma-separated targets, e.g. ort:cpu:fp32,emu:fp16.")
    return targets


def _parse(spec: str, plan: str | Path | None) -> Target:
    if not isinstance(spec, str) or not spec.strip():
        raise TargetError(_unknown(str(spec)))
    text, options = spec.strip(), {}
    if "@" in text:
        head, tail = text.rsplit("@", 1)
        if not _OPTION.match(tail):
            raise TargetError(f"Target {spec!r}: runtime options are written @key=value,key=value (got {tail!r}).")
        if "@" in head and _OPTION.match(head.rsplit("@", 1)[1]):
            raise TargetError(f"Target {spec!r}: runtime options are one list after a single '@', separated by commas "
                              f"(e.g. {head.split('@', 1)[0]}@{head.split('@', 1)[1].replace('@', ',')},{tail}).")
        text, options = head, dict(kv.split("=", 1) for kv in tail.split(","))
    text, _, extra = text.partition("+")
    parts = [p.strip().lower() for p in text.split(":")]
    if not parts or parts[0] not in backends() or any(not p for p in parts):
        raise TargetError(_unknown(spec))
    runtime, rest = parts[0], parts[1:]
    described = backend(runtime)
    devices = described.devices
    device = rest.pop(0) if rest and rest[0] in devices else described.default_device
    precision = rest.pop(0) if rest else described.default_precision
    if rest or precision not in devices[device]:
        raise TargetError(_unknown(spec))
    pins, plan_path = _pins(spec, extra, plan)
    if plan_path is not None:
        _check_plan_precision(plan_path, f"{runtime}:{device}:{precision}")
    if precision == "int8" and plan_path is not None:  # the quantizer settings and calibration the plan was verified with
        planned = read_plan_quantization(plan_path)
        # a runtime whose INT8 kernels force settings (TensorRT: s8s8 symmetric) takes them whatever the plan was searched with
        planned = {k: v for k, v in planned.items() if k not in described.int8_forced}
        options = {**planned, **options}  # explicit options contradicting the plan are refused by Target.parse
    return Target(runtime, device, precision, pins, plan_path, tuple(sorted(options.items())))


def _pins(spec: str, extra: str, plan: str | Path | None) -> tuple[tuple[str, ...], str | None]:
    if not extra:
        return (), None
    if extra.startswith("fp32="):
        return tuple(n for n in extra[len("fp32="):].split(",") if n), None
    if extra == "plan":
        if plan is None:
            raise InputError(f"Target {spec!r} asks for the plan, but no plan was given (--plan plan.json).")
        return tuple(read_plan(plan)), str(plan)
    return tuple(read_plan(extra)), extra


def read_plan(path: str | Path) -> list[str]:
    """The FP32 nodes of a plan file written by ``aligner precision --out``."""
    if not Path(path).is_file():
        raise InputError(f"Plan {path}: file not found (cwd is {Path.cwd()}). Check the path, or write one with: "
                         "aligner precision model.onnx --out plan.json")
    try:
        data = json.loads(Path(path).read_text())
        nodes = [p["node"] for p in data["fp32_nodes"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"Plan {path}: not a plan written by aligner precision ({type(exc).__name__}: {exc}). "
                         "Write one with: aligner precision model.onnx --out plan.json") from None
    if not all(isinstance(n, str) for n in nodes):
        raise InputError(f"Plan {path}: fp32_nodes must name nodes (strings).")
    return nodes


def plan_doc(path: str | Path) -> dict:
    """A plan file's JSON, or {} when it cannot be read as one (:func:`read_plan` says what is wrong)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _check_plan_precision(path: str | Path, base: str) -> None:
    """An INT8 plan names nodes kept in float, an FP16/BF16 plan nodes kept in FP32: one is no plan for the other."""
    planned = plan_doc(path).get("precision")
    if isinstance(planned, str) and (planned == "int8") != base.endswith(":int8"):
        raise InputError(f"Plan {path} was searched for {planned}, target {base} is {base.rsplit(':', 1)[-1]}: an INT8 plan keeps nodes "
                         "in float, an FP16/BF16 plan keeps nodes in FP32. Search one for this target: aligner precision MODEL "
                         f"--target {base} --out plan.json")


def read_plan_quantization(path: str | Path) -> dict[str, str]:
    """The quantizer settings and calibration data (``calib``: the path it recorded) an INT8 plan was
    searched and verified with, as target options ({} for FP16 plans): ``ort:cpu:int8+plan.json``
    quantizes as the plan did (:mod:`aligner.backends.replay` checks the data is the same)."""
    quantization = plan_doc(path).get("quantization")
    settings = quantization.get("settings") if isinstance(quantization, dict) else None
    if not isinstance(settings, dict):
        return {}
    calibration = quantization.get("calibration")
    calib = calibration.get("path") if isinstance(calibration, dict) else None
    out = {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in settings.items()
           if k in ("calibrate", "types", "reduce_range", "per_channel", "symmetric", "fallback", "quantize_bias")}
    for key, default in (("symmetric", "0"), ("fallback", "fp32"), ("quantize_bias", "1")):  # defaults everywhere they may be given
        if out.get(key) == default:
            del out[key]
    if settings.get("calibrate") == "percentile":
        out["percentile"] = f"{settings.get('percentile', 99.999):g}"
    return {**out, **({"calib": calib} if isinstance(calib, str) and calib else {})}


def _check_plan_settings(target: Target) -> None:
    """An INT8 ``+plan.json`` target quantizes with the settings the plan was verified with: an option
    that contradicts them is refused (other settings make another QDQ model than the one verified)."""
    from aligner.quant.quantize import QuantSettings

    quantization = plan_doc(target.plan).get("quantization")
    recorded = quantization.get("settings") if isinstance(quantization, dict) else None
    if not isinstance(recorded, dict) or not recorded:
        return
    try:
        planned = QuantSettings(**{k: v for k, v in recorded.items() if k in QuantSettings.__dataclass_fields__}).options()
    except TypeError:
        return
    given = QuantSettings.of(target).options()
    skip = backend(target.runtime).int8_forced
    differ = sorted(k for k in set(planned) | set(given) if k not in skip and planned.get(k) != given.get(k))
    if differ:
        shown = lambda opts: ", ".join(f"{k}={opts.get(k, '(default)')}" for k in differ)  # noqa: E731
        raise PlanError(f"Target {target.base}+{target.plan}: the plan was verified with {shown(planned)}; this target sets "
                        f"{shown(given)}, which quantizes another model. Drop those options to replay the plan, or search a plan "
                        f"with them: aligner precision MODEL --target {target.base}@{','.join(f'{k}={given.get(k)}' for k in differ if k in given)} "
                        "--out plan.json")


def _unknown(spec: str) -> str:
    return (f"Unknown target {spec!r}. Valid targets: {', '.join(valid_targets())}; written "
            "runtime[:device][:precision][+plan.json][@key=value], e.g. ort:cuda:fp16+plan.json, emu:fp16, ort:cpu:int8@calib=calib/, torch:cuda:bf16.")


__all__ = ["DEFAULT_TARGET", "REFERENCE", "Target", "parse_target", "split_targets", "plan_doc", "read_plan", "read_plan_quantization",
           "valid_targets"]
