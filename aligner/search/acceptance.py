"""When a precision trial passes: the acceptance check of ``aligner precision`` (``--accept``,
``--accept-cmd``, a callable, a task metric), and the output check every runner's outputs go through."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from aligner.compare.metrics import HIGHER_IS_BETTER, METRICS, all_metrics, nonfinite_counts
from aligner.compare.tolerance import default_tolerance
from aligner.errors import InputError

_BOUND = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+|inf)\s*$")


@dataclass(frozen=True)
class Acceptance:
    """When a trial passes: outputs finite where the reference is, every ``bounds`` holds on every
    output and sample, and ``command`` (``{model}`` = the mixed model) / ``check`` say yes."""

    bounds: tuple[tuple[str, str, float], ...] = ()
    finite: bool = True
    command: str | None = None
    check: Callable[[onnx.ModelProto], bool] | None = field(default=None, compare=False)
    # A task metric on the trial's own target: gets the trial's runner, returns "" (pass) or why not.
    task: Callable[[object], str] | None = field(default=None, compare=False)
    task_name: str = ""

    @classmethod
    def parse(cls, specs: Iterable[str] = (), command: str | None = None, check=None) -> "Acceptance":
        bounds = []
        for spec in specs:
            m = _BOUND.match(spec)
            if not m or m.group(1) not in METRICS:
                raise InputError(f"--accept {spec!r}: write METRIC<=VALUE or METRIC>=VALUE with METRIC one of {sorted(METRICS)}, "
                                 f"e.g. 'rel_l2<=5e-3' or 'cosine>=0.999'.")
            bounds.append((m.group(1), m.group(2), float(m.group(3))))
        return cls(tuple(bounds), True, command, check)

    def describe(self) -> tuple[str, ...]:
        parts = ["outputs finite"] if self.finite else []
        parts += [f"{m}{op}{v:g}" for m, op, v in self.bounds]
        if self.command:
            parts.append(f"command: {self.command}")
        if self.check is not None:
            parts.append(f"callable: {getattr(self.check, '__name__', 'check')}")
        if self.task is not None:
            parts.append(self.task_name or "task metric")
        return tuple(parts)

    def judge(self, metrics: dict[str, float]) -> str:
        """'' when the bounds hold, else what failed."""
        for metric, op, value in self.bounds:
            got = metrics.get(metric, math.nan)
            ok = {"<=": got <= value, "<": got < value, ">=": got >= value, ">": got > value}[op]
            if not ok:
                return f"{metric} {got:.3g} fails {metric}{op}{value:g}"
        return ""

    def check_outputs(self, reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                      worst: dict[str, float] | None = None) -> str:
        """'' when every float output of ``got`` is finite where ``reference`` is and every bound
        holds, else the first failure; ``worst`` (updated in place) collects each metric's worst value."""
        reason = ""
        for name, r in reference.items():
            if r.dtype.kind != "f":
                continue
            t = got[name]
            if self.finite and nonfinite_counts(t).total > nonfinite_counts(r).total:
                reason = reason or f"output {name!r} has NaN/inf"
            m = all_metrics(r, t)
            if worst is not None:
                for k, v in m.items():
                    v = v if not np.isnan(v) else math.inf
                    worst[k] = max(worst.get(k, -math.inf), v) if k not in HIGHER_IS_BETTER else min(worst.get(k, math.inf), v)
            reason = reason or self.judge(m)
        return reason


def default_acceptance(precision: str) -> Acceptance:
    tol = default_tolerance(precision)
    op = ">=" if tol.metric in HIGHER_IS_BETTER else "<="
    return Acceptance(((tol.metric, op, tol.threshold),))


__all__ = ["Acceptance", "default_acceptance"]
