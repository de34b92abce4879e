"""The Runner protocol every backend implements, and the few helpers the backends share.

A runner runs one model on one :class:`~aligner.backends.target.Target`:

* ``run(feeds, capture=())`` returns the graph outputs, or exactly the ``capture`` tensors (any
  name in ``capturable``; an unknown name is the same :class:`InputError` in every backend);
* ``time(feeds, runs, warmup)`` returns the milliseconds of each timed run, after ``warmup``
  untimed ones; on CUDA the inputs stay on the device and each run is synchronised;
* ``describe_inputs()`` says what the runtime takes: names, shapes (symbolic dims as names),
  numpy dtypes.

Runtime options (``target.options``) are checked against each backend's documented names when
the runner is made: an unknown key is a :class:`TargetError` that lists the known ones.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from aligner.backends.target import Target
from aligner.errors import InputError, TargetError, close_matches, unknown_name_message


@dataclass(frozen=True)
class InputInfo:
    """One input of a runner: its name, shape (ints, symbolic dims as names, None when unknown), dtype."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str  # numpy dtype name: "float32", "float16", "int64"... ("bfloat16" where numpy has none)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}


@runtime_checkable
class Runner(Protocol):
    """Runs one model on one target (see the module docstring for the contract)."""

    target: Target
    label: str  # how errors and results name this runner (the target, or "reference ort:cpu:fp32")
    input_names: list[str]
    output_names: list[str]
    capturable: frozenset[str]  # tensor names this runner can capture

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]: ...

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]: ...

    def describe_inputs(self) -> tuple[InputInfo, ...]: ...


def describe_model_inputs(model) -> tuple[InputInfo, ...]:
    """The inputs of an ``onnx.ModelProto`` (initializers listed as inputs left out)."""
    from onnx import TensorProto, helper

    initializers = {t.name for t in model.graph.initializer}
    infos = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim) \
            if tensor.HasField("shape") else None
        elem = tensor.elem_type
        dtype = ("bfloat16" if elem == TensorProto.BFLOAT16 else np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name) if elem else "unknown"
        infos.append(InputInfo(value.name, shape, dtype))
    return tuple(infos)


def check_capture(capture: Iterable[str], capturable: frozenset[str]) -> tuple[str, ...]:
    """``capture`` without duplicates, in order; an unknown name is an InputError with suggestions."""
    capture = tuple(dict.fromkeys(capture))
    for name in capture:
        if name not in capturable:
            raise InputError(unknown_name_message("tensor", name, capturable))
    return capture


# Options every runtime takes: how aligner observes the target, not how the runtime computes.
COMMON_OPTIONS = {
    "capture": "boundaries|all|outputs: which tensors comparisons capture (default: boundaries on fusing targets — "
               "ONNX Runtime fp16/bf16 or CUDA — so capturing does not change what is deployed; outputs on TensorRT; else all)",
}


CapturePolicy = Literal["boundaries", "all", "outputs"]
POLICIES = ("boundaries", "all", "outputs")


def capture_policy(target: Target) -> CapturePolicy:
    """The target's ``capture`` option, or its runtime's default (its descriptor's ``capture_default``):
    ``boundaries`` where fusions change the numbers (TensorRT: the tensors its engine's layers write;
    ONNX Runtime in FP16/BF16 or on CUDA; the emulator emulating fusions; OpenVINO), ``all``
    elsewhere (the reference, the plain emulator, ORT CPU FP32)."""
    chosen = target.option_dict.get("capture")
    if chosen is not None:
        if chosen not in POLICIES:
            raise TargetError(f"Target {target}: capture={chosen!r}; choose one of {', '.join(POLICIES)}.")
        return chosen  # type: ignore[return-value]
    from aligner.backends.registry import backend_of

    return backend_of(target).capture_default(target)


def check_options(target: Target, known: Mapping[str, str], elsewhere: Mapping[str, str] | None = None) -> dict[str, str]:
    """The target's runtime options, every key one of ``known`` (name -> what it sets); a key of
    ``elsewhere`` (name -> why it does not apply here) gets that reason."""
    options = target.option_dict
    known = {**known, **COMMON_OPTIONS}
    capture_policy(target)  # a bad capture policy is named here, whatever the runtime
    for key in options:
        if key in known:
            continue
        listed = ", ".join(known) or "none"
        if elsewhere and key in elsewhere:
            raise TargetError(f"Target {target}: runtime option {key!r} is {elsewhere[key]}. Options of {target.base}: {listed}.")
        near = close_matches(key, known, n=3)
        raise TargetError(f"Target {target}: unknown runtime option {key!r}." + (f" Did you mean: {', '.join(near)}?" if near else "")
                          + f" Options of {target.base}: {listed}.")
    return options


def choice_option(target: Target, key: str, value: str, choices: Iterable[str]) -> str:
    """``value`` lower-cased when it is one of ``choices``, else a TargetError naming them."""
    choices = list(choices)
    if value.lower() not in choices:
        raise TargetError(f"Target {target}: option {key}={value!r}; choose one of {', '.join(choices)}.")
    return value.lower()


def int_option(target: Target, key: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TargetError(f"Target {target}: option {key}={value!r}; give a whole number >= {minimum}.")
    return number


def time_runs(once: Callable[[], None], runs: int, warmup: int, sync: Callable[[], None] = lambda: None,
              after_first: Callable[[], None] = lambda: None) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``once`` after ``warmup`` untimed ones; ``sync``
    runs before the clock is read (device work finished), ``after_first`` after the first call
    (e.g. to raise an error a plugin op recorded)."""
    if runs < 1 or warmup < 0:
        raise InputError(f"Timing needs runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup}).")
    times = []
    for i in range(warmup + runs):
        sync()
        start = _time.perf_counter()
        once()
        sync()
        if i >= warmup:
            times.append((_time.perf_counter() - start) * 1e3)
        if i == 0:
            after_first()
    return times


__all__ = ["InputInfo", "Runner", "check_capture", "describe_model_inputs", "check_options", "choice_option", "int_option", "time_runs"]
