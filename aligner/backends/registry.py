"""The runtimes aligner drives, one :class:`Backend` descriptor each, and the registry that finds them.

A descriptor says everything the rest of aligner may know about a runtime: the devices and
precisions a target of it may name and their defaults, how its runtime options are checked, the
factory of its :class:`~aligner.backends.base.Runner`, and its declared capabilities (does it fuse,
how comparisons observe it, can its speed be timed, can it be built, tuned, sandboxed). Code
outside ``aligner.backends`` asks the descriptor (:func:`backend_of`) instead of branching on a
runtime's name, so adding a runtime is one folder under ``aligner/backends/`` defining ``BACKEND``
and one line in :data:`RUNTIMES` (or, from another package, an ``aligner.backends`` entry point).

Descriptors are light: a runtime's own modules (and its optional dependency) are imported by the
hooks that need them, never when the registry loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from aligner.errors import TargetError

if TYPE_CHECKING:  # pragma: no cover
    from aligner.backends.base import Runner
    from aligner.backends.target import Target
    from aligner.graph.model import ModelGraph

# runtime name in target specs -> the module whose BACKEND describes it: the one registry line per runtime
RUNTIMES: dict[str, str] = {
    "ort": "aligner.backends.ort",
    "emu": "aligner.backends.emu",
    "trt": "aligner.backends.trt",
    "torch": "aligner.backends.torch",
    "ov": "aligner.backends.openvino",
}

CapturePolicy = Literal["boundaries", "all", "outputs"]


def _never(target: "Target") -> bool:
    return False


def _all(target: "Target") -> CapturePolicy:
    return "all"


def _none(target: "Target") -> dict:
    return {}


def _no_advice(target: "Target") -> str:
    return ""


def _itself(target: "Target") -> "Target":
    return target


@dataclass(frozen=True)
class Backend:
    """One runtime: what its targets may say, how to run them, and what it can do.

    Hooks take the parsed :class:`~aligner.backends.target.Target`; every one has a default that
    suits a runtime which does not fuse, cannot be built or tuned and runs in process."""

    name: str  # the runtime in target specs: "ort"
    title: str  # how messages name it: "ONNX Runtime"
    devices: Mapping[str, tuple[str, ...]]  # device -> the precisions a target may name on it
    default_device: str
    default_precision: str
    runner: Callable[["ModelGraph", "Target", bool, object], "Runner"]  # factory(graph, target, keep_io_types, module)
    options: Callable[["Target"], dict[str, str]]  # the target's runtime options checked (an unknown key: TargetError)
    qdq_runner: Callable[..., "Runner"] | None = None  # factory(qdq_model, target, path, label): a QDQ model as it is (INT8)
    help: str = ""  # the lines of ``targets:`` in every command's --help
    runs_onnx: bool = True  # False: it runs a PyTorch module (the graph only names inputs and outputs)
    timed: bool = True  # aligner bench times it (an emulator's speed means nothing)
    fuses: Callable[["Target"], bool] = _never  # its kernels may differ from the graph's nodes (deployed graph, capture checks)
    capture_default: Callable[["Target"], CapturePolicy] = _all  # which tensors a comparison captures by default
    segmentable: Callable[["Target"], bool] = _never  # the model cut into pieces computes what the whole model computes
    captures_cheaply: bool = False  # every tensor in one run costs about one run (bisect's "all" strategy on auto)
    optimizes: Callable[["Target"], bool] = _never  # a graph optimizer runs (an isolated piece needs its own session)
    sandboxed: Callable[["Target"], bool] = _never  # runs in a child process (a runtime crash is a verdict)
    workarounds: Callable[["Target"], dict[str, "Target"]] = _none  # candidate fixes of a runtime failure: label -> target
    advice: Callable[["Target"], str] = _no_advice  # what to try when this target is slower than a higher precision
    deploys_as: Callable[["Target"], "Target | None"] = _itself  # the runtime target a build and a timing use (None: none)
    runnable_here: Callable[["Target"], tuple["Target", str]] = lambda target: (target, "")  # (a target this machine runs, why not the one given)
    build: Literal["onnx", "engine"] | None = None  # what aligner build writes for it
    not_built: str = ""  # what to ship instead, where aligner build writes nothing for it
    build_check: Callable[["Target"], None] | None = None  # checks before a build's work (options' values, the library)
    tune: Callable[["Target", "ModelGraph"], list[dict[str, str]]] | None = None  # option candidates of build --tune
    tune_check: Callable[["Target"], None] | None = None
    not_tuned: str = "its options are recorded as given"  # why --tune does not apply, where it does not
    int8_defaults: Mapping[str, str] = field(default_factory=dict)  # quantizer settings its INT8 defaults to (TensorRT: s8s8 symmetric)
    int8_takes: str = ""  # the INT8 its kernels take, in words ("signed, symmetric INT8 with float biases")
    int8_forced: tuple[str, ...] = ()  # of those, the ones its INT8 kernels force (a target or plan saying otherwise is refused)
    int8_emulated: bool = False  # INT8 Q/DQ evaluated in float (the fallback's rounding emulated)
    cpu_integer_kernels: Callable[["Target"], bool] = _never  # INT8 on this CPU's integer kernels (u8s8 saturate without VNNI:
    # reduce_range=1 by default; what stays unquantized runs FP32, so an FP16 fallback is not computed there; a build is checked on them)
    short: bool = False  # one device only, so specs are written without it (emu:fp16, trt:fp16)


_LOADED: dict[str, Backend] | None = None


def backends() -> dict[str, Backend]:
    """Every registered runtime's descriptor, by name (loaded on first use)."""
    global _LOADED
    if _LOADED is None:
        loaded: dict[str, Backend] = {}
        for name, module in RUNTIMES.items():
            backend = importlib.import_module(module).BACKEND
            if backend.name != name:
                raise TargetError(f"{module}.BACKEND is named {backend.name!r}, registered as {name!r}.")
            loaded[name] = backend
        loaded.update(_entry_points(loaded))
        _LOADED = loaded
    return _LOADED


def _entry_points(known: Mapping[str, Backend]) -> dict[str, Backend]:
    """Runtimes other packages register (entry point group ``aligner.backends``: name = module:BACKEND)."""
    from importlib.metadata import entry_points

    found = {}
    for point in entry_points(group="aligner.backends"):
        if point.name in known:
            continue
        try:
            backend = point.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not break aligner: it is left out, said once
            import logging

            logging.getLogger(__name__).warning("backend %s from %s not loaded: %s", point.name, point.value, exc)
            continue
        if isinstance(backend, Backend) and backend.name == point.name:
            found[point.name] = backend
    return found


def backend(runtime: str) -> Backend:
    """The descriptor of ``runtime`` (a TargetError naming the registered ones otherwise)."""
    found = backends().get(runtime)
    if found is None:
        raise TargetError(f"Unknown runtime {runtime!r}; runtimes: {', '.join(backends())}.")
    return found


def backend_of(target: "Target") -> Backend:
    """The descriptor of ``target``'s runtime."""
    return backend(target.runtime)


__all__ = ["Backend", "CapturePolicy", "RUNTIMES", "backend", "backend_of", "backends"]
