"""One target resolution for every command and the library: the spec, a plan, pins, options,
calibration data and a built model's sidecar, decided in one place (:func:`resolve_target`).

A model written by ``aligner build`` has a sidecar beside it (``MODEL.json``) naming the target it
was built for, with its runtime options (tuned ones included). Given such a model and no target,
a command runs it on that target; given a target of the same runtime and device, the target takes
the sidecar's options under its own (an explicit ``@key=value`` wins). The CLI and
``aligner.compare("m.fp16.onnx")`` from Python resolve the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aligner.backends.target import DEFAULT_TARGET, REFERENCE, Target
from aligner.errors import AlignerError, InputError

log = logging.getLogger(__name__)


def sidecar_path(output: str | Path) -> Path:
    """Where a build's sidecar JSON goes: beside the output, ``.json`` appended."""
    return Path(str(output) + ".json")


@dataclass(frozen=True)
class Sidecar:
    """A build's sidecar read back: where it is, the model it describes, the target it was built for."""

    path: Path  # the JSON
    model: Path  # the built model beside it
    target: Target  # as built: pins, plan name and runtime options (tuned ones included)
    kind: str  # "onnx" or "engine"


def read_sidecar(path: str | Path) -> Sidecar | None:
    """The sidecar of a built model: ``path`` is the model (``<path>.json`` beside it) or the sidecar
    itself. None for a model without one; a JSON given directly that is not a sidecar is an error."""
    path = Path(path)
    given = path.suffix.lower() == ".json"
    json_path = path if given else sidecar_path(path)
    if not json_path.is_file():
        if given:
            raise InputError(f"{path}: no such file. Give the built model or its sidecar (written by aligner build -o MODEL).")
        return None
    try:
        doc = json.loads(json_path.read_text())
        t = doc["target"]
        target = Target(t["runtime"], t["device"], t["precision"], tuple(t.get("fp32_nodes") or ()), t.get("plan"),
                        tuple(sorted((str(k), str(v)) for k, v in (t.get("options") or {}).items())))
        kind = doc["kind"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, AlignerError) as exc:
        if given:
            raise InputError(f"{path}: not a sidecar written by aligner build ({type(exc).__name__}: {exc}).") from None
        return None  # a JSON of the user's own beside the model: not ours
    model = json_path.with_name(json_path.name[: -len(".json")]) if json_path.name.endswith(".json") else json_path
    if given and not model.is_file():
        raise InputError(f"{path}: the model it describes, {model}, is not beside it.")
    return Sidecar(json_path, model, target, kind)


def resolve_target(spec: "str | Target | None" = None, *, model: "str | Path | None" = None, plan: "str | Path | None" = None,
                   pins: Iterable[str] = (), options: Mapping[str, str] | None = None, calib: "str | Path | None" = None,
                   inputs: "str | None" = None, second_graph: bool = False, sidecar: "Sidecar | None" = None,
                   say: Callable[[str], None] | None = None) -> Target:
    """The target a command runs: ``spec`` (None: the sidecar's target when ``model`` is a built model,
    else :data:`DEFAULT_TARGET`, or the reference runtime when a ``second_graph`` is compared) with
    ``plan`` (``+plan``), ``pins`` and ``options`` folded in, the sidecar's runtime options under its own,
    and for INT8 (or with ``calib``) its calibration data (``inputs``: where the command's inputs came
    from, the fallback). ``say`` gets the lines a user should see (default: the log)."""
    say = say or log.info
    if sidecar is None and model is not None:
        sidecar = read_sidecar(model)
    pins = [p for p in pins if p]
    if spec is None and sidecar is not None and not second_graph and not plan and not pins:
        built = sidecar.target
        say(f"target from {sidecar.path.name}: {built} (options: {_shown(built)})")
        return built.with_options(options or {})  # as built (an INT8 build is its QDQ model: no calibration)
    spec = spec if spec is not None else (REFERENCE if second_graph else DEFAULT_TARGET)
    if isinstance(spec, str) and plan:
        head, at, tail = spec.partition("@")  # +plan goes before the @options (whose values may hold '+')
        if "+" not in head:
            spec = f"{head}+plan{at}{tail}"
    target = with_sidecar(Target.parse(spec, pins=pins, plan=plan, options=options), sidecar, say)
    if target.is_quantized or calib:
        from aligner.quant.calib import with_calibration

        target = with_calibration(target, calib, inputs)
    return target


def target_for_model(target: "str | Target | None", model, second_graph: bool = False) -> "tuple[Target, object]":
    """(the target, the model to load) for a library call given ``model`` (a path, or a ModelGraph
    already loaded) and ``target`` (None: the built model's own, else the default): a built model's
    sidecar decides as on the command line (:func:`resolve_target`); given the sidecar JSON itself,
    the model is the one it describes."""
    sidecar = read_sidecar(model) if isinstance(model, (str, Path)) else None
    if sidecar is not None and Path(model).suffix.lower() == ".json":
        model = sidecar.model
    return resolve_target(target, second_graph=second_graph, sidecar=sidecar), model


def with_sidecar(target: Target, sidecar: "Sidecar | None", say: Callable[[str], None] | None = None) -> Target:
    """``target`` with a built model's runtime options under its own, where it is the same runtime and
    device as the build (explicit options win)."""
    if sidecar is None or not sidecar.target.options or (target.runtime, target.device) != (sidecar.target.runtime, sidecar.target.device):
        return target
    built = sidecar.target
    overridden = sorted(k for k in built.option_dict if target.option_dict.get(k, built.option_dict[k]) != built.option_dict[k])
    (say or log.info)(f"options from {sidecar.path.name}: {_shown(built)} (for {target.base}"
                      + (f"; overridden on the command line: {', '.join(overridden)}" if overridden else "") + ")")
    return target.with_options({**built.option_dict, **target.option_dict})


def _shown(target: Target) -> str:
    return ",".join(f"{k}={v}" for k, v in target.options) or "none"


__all__ = ["Sidecar", "read_sidecar", "resolve_target", "sidecar_path", "target_for_model", "with_sidecar"]
