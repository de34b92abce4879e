"""When a tensor diverges: the one verdict rule, its defaults per target precision, and its grammar.

One :class:`Tolerance` judges every verdict — compare, every bisect strategy, precision's
acceptance, build's, tune's and the INT8 build's checks: a tensor diverges when its NaN/inf pattern
differs from the reference, or when ``metric`` is beyond ``threshold`` AND the largest absolute
error exceeds ``atol`` (tensors that are ~0 on both sides do not diverge on relative metrics).
Per-output overrides judge named outputs by their own metric/threshold/atol; an optional external
check (a command, a callable, a task metric such as COCO AP) is composed on top by those that run
whole models (:mod:`aligner.search.acceptance`).

The grammar (``--accept``, a plan's recorded rule) is what :meth:`Tolerance.describe` prints::

    rel_l2<=5e-3                          threshold; atol stays the precision's default (or --atol)
    rel_l2 <= 0.005 (or max_abs <= 1e-4)  threshold and atol
    cosine>=0.999                         higher-is-better metrics take >=
    boxes: rel_l2<=1e-2                   the rule of one output (repeatable, one per output)
    finite                                outputs finite where the reference is, no metric bound
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from aligner.compare.metrics import HIGHER_IS_BETTER, METRICS, NonFinite
from aligner.errors import InputError, close_matches, unknown_name_message


@dataclass(frozen=True)
class Tolerance:
    """The verdict rule (module docstring). ``outputs`` holds per-output rules (name, plain
    Tolerance); ``command`` (``{model}`` = the model judged; exit 0 = pass), ``check`` (a callable
    on the ONNX model) and ``task`` (gets the runner, returns '' or why not; ``task_name`` says
    what it measures) are the external check, run on top of the output rule where whole models
    are judged (precision's trials)."""

    metric: str = "rel_l2"
    threshold: float = 1e-4
    atol: float = 1e-5
    outputs: tuple[tuple[str, Tolerance], ...] = ()
    command: str | None = None
    check: Callable[[object], bool] | None = field(default=None, compare=False)
    task: Callable[[object], str] | None = field(default=None, compare=False)
    task_name: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InputError(unknown_metric(self.metric))
        higher = self.metric in HIGHER_IS_BETTER
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold) or self.threshold == (math.inf if higher else -math.inf):
            raise InputError(f"Tolerance threshold must be a number ({'-' if higher else ''}inf: no {self.metric} bound); got {self.threshold!r}.")
        if not isinstance(self.atol, (int, float)) or not np.isfinite(self.atol) or self.atol < 0:
            raise InputError(f"Tolerance atol must be a finite number >= 0; got {self.atol!r}.")
        for name, rule in self.outputs:
            if rule.outputs or rule.external:
                raise InputError(f"The rule of output {name!r} is a metric, threshold and atol; the external check belongs to the whole rule.")

    @classmethod
    def parse(cls, specs: Iterable[str] = (), command: str | None = None, check: Callable[[object], bool] | None = None,
              base: Tolerance | None = None) -> Tolerance:
        """:func:`parse_tolerance` on ``base`` (None: the FP16 default; the CLI passes the target's)."""
        return parse_tolerance(specs, base or DEFAULT_TOLERANCES["fp16"], command, check)

    @classmethod
    def from_dict(cls, doc: Mapping) -> Tolerance:
        """The rule :meth:`to_dict` wrote (the external check is not code in a file: not rebuilt)."""
        outputs = tuple((name, cls(**rule)) for name, rule in (doc.get("outputs") or {}).items())
        return cls(doc["metric"], float(doc["threshold"]), float(doc["atol"]), outputs)

    @property
    def bounded(self) -> bool:
        """False for the rule ``finite``: outputs finite where the reference is, no metric bound."""
        return math.isfinite(self.threshold)

    @property
    def external(self) -> bool:
        return bool(self.command) or self.check is not None or self.task is not None

    def worse(self, value: float) -> bool:
        """``value`` of ``metric`` is beyond the threshold (NaN is)."""
        if math.isnan(value):
            return True
        return value < self.threshold if self.metric in HIGHER_IS_BETTER else value > self.threshold

    def exceeded(self, metrics: Mapping[str, float]) -> bool:
        return bool(self.worse(metrics[self.metric]) and metrics["max_abs"] > self.atol)

    def for_output(self, name: str) -> Tolerance:
        """The rule ``name`` is judged by: its override, else this rule's metric, threshold and atol."""
        return next((rule for output, rule in self.outputs if output == name), self)

    def check_names(self, outputs: Iterable[str]) -> None:
        """Refuse overrides of outputs the model does not have, naming those it has."""
        known = list(outputs)
        for name, _ in self.outputs:
            if name not in known:
                raise InputError(unknown_name_message("output", name, known) + " (in the rule 'OUTPUT: METRIC<=VALUE')")

    def describe(self) -> str:
        """``rel_l2 <= 0.02 (or max_abs <= 0.001)``: the rule as printed in every verdict (and parsed back)."""
        return "; ".join(self.clauses())

    def clauses(self) -> tuple[str, ...]:
        """The rule as separate clauses: the rule of every output, each override, the external
        check; :func:`parse_tolerance` reads the first two kinds back."""
        parts = [self._bound()] + [f"{name}: {rule._bound()}" for name, rule in self.outputs]
        if self.command:
            parts.append(f"command: {self.command}")
        if self.check is not None:
            parts.append(f"callable: {getattr(self.check, '__name__', 'check')}")
        if self.task is not None:
            parts.append(self.task_name or "task metric")
        return tuple(parts)

    def _bound(self) -> str:
        if not self.bounded:
            return "finite (no metric bound)"
        if self.metric == "max_abs" and self.atol <= self.threshold:
            return f"max_abs <= {self.threshold:g}"
        op = ">=" if self.metric in HIGHER_IS_BETTER else "<="
        return f"{self.metric} {op} {self.threshold:g} (or max_abs <= {self.atol:g})"

    def to_dict(self) -> dict:
        """metric, threshold, atol (``Tolerance(**d)`` rebuilds a plain rule); overrides and the
        external check only when present."""
        out = {"metric": self.metric, "threshold": self.threshold, "atol": self.atol}
        if self.outputs:
            out["outputs"] = {name: rule.to_dict() for name, rule in self.outputs}
        if self.external:
            out["external"] = [c for c in self.clauses() if c.startswith(("command: ", "callable: "))] + ([self.task_name or "task metric"] if self.task else [])
        return out


# FP16 rounds each stored value with relative error up to 2^-11 (4.9e-4); BF16 up to 2^-8 (3.9e-3).
# The defaults allow that error to grow through a few dozen layers before calling a tensor divergent.
DEFAULT_TOLERANCES = {
    "fp32": Tolerance("rel_l2", 1e-4, 1e-5),
    "tf32": Tolerance("rel_l2", 5e-3, 1e-4),
    "fp16": Tolerance("rel_l2", 2e-2, 1e-3),
    "bf16": Tolerance("rel_l2", 1e-1, 1e-2),
    # INT8 (8-bit uniform steps of a calibrated range): a few % per tensor is normal quantization noise.
    "int8": Tolerance("rel_l2", 5e-2, 1e-2),
}
LOOSENESS = ("fp32", "tf32", "fp16", "bf16", "int8")  # autocast computes in FP16: judged as fp16
# Thresholds of the other metrics when only --metric is given (no --threshold).
METRIC_DEFAULTS = {"cosine": 0.999, "snr_db": 40.0, "max_abs": 1e-3, "mean_abs": 1e-4, "mvre": 1e-2}


def defaults_text() -> str:
    """The default rule per precision, as help texts print it: ``fp32 1e-4/1e-5, ...`` (threshold/atol)."""
    return ", ".join(f"{p} {t.threshold:.0e}/{t.atol:.0e}".replace("e-0", "e-") for p, t in DEFAULT_TOLERANCES.items())


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get("fp16" if precision == "autocast" else precision, DEFAULT_TOLERANCES["fp32"])


def tolerance_for(target, reference=None, metric: str = "rel_l2", threshold: float | None = None,
                  atol: float | None = None) -> Tolerance:
    """The one tolerance policy: the default of the lower of the two precisions compared (the
    target's, or the reference's when that is lower), whatever the command and whether the target
    runs the same graph or a second one; ``metric`` / ``threshold`` / ``atol`` override parts of it.

    ``target`` and ``reference`` are :class:`~aligner.backends.target.Target` values."""
    precisions = [p if p != "autocast" else "fp16" for p in (target.precision, reference.precision if reference else "fp32")]
    base = default_tolerance(max(precisions, key=lambda p: LOOSENESS.index(p) if p in LOOSENESS else 0))
    if threshold is None:
        threshold = base.threshold if metric == base.metric else METRIC_DEFAULTS.get(metric, base.threshold)
    elif not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise InputError(f"--threshold must be a finite number; got {threshold!r} (a rule that checks only NaN/inf is written "
                         "--accept finite, on precision and build).")
    return Tolerance(metric, threshold, _atol(metric, threshold, base.atol if atol is None else atol, atol is not None))


def _atol(metric: str, threshold: float, atol: float, given: bool) -> float:
    """A ``max_abs`` bound below the default atol means that bound (the default atol would loosen it)."""
    if metric == "max_abs" and not given and math.isfinite(threshold):
        return max(0.0, min(atol, threshold))
    return atol


_BOUND = re.compile(r"^(?:(?P<output>.+?)\s*:\s*)?(?P<metric>[A-Za-z_0-9]+)\s*(?P<op><=|>=|<|>)\s*(?P<value>[-+0-9.eE]+|[-+]?inf)"
                    r"(?:\s*\(?\s*or\s+max_abs\s*<=\s*(?P<atol>[-+0-9.eE]+)\s*\)?)?$")
_FINITE = re.compile(r"^(?:(?P<output>.+?)\s*:\s*)?(?:outputs\s+)?finite(?:\s*\(.*\))?$")
GRAMMAR = ("write METRIC<=VALUE (or METRIC>=VALUE for cosine, snr_db), optionally '(or max_abs <= ATOL)', optionally "
           "'OUTPUT: ' before it for one output, or 'finite'; e.g. 'rel_l2<=5e-3', 'cosine>=0.999', "
           "'boxes: rel_l2<=1e-2 (or max_abs<=1e-3)'")


def parse_tolerance(specs: Iterable[str], base: Tolerance = DEFAULT_TOLERANCES["fp16"], command: str | None = None,
                    check: Callable[[object], bool] | None = None) -> Tolerance:
    """The rule the clauses ``specs`` (module docstring) write, on top of ``base`` (the precision's
    default with any --metric/--threshold/--atol): a clause without ``(or max_abs <= ATOL)`` takes
    ``base.atol``; one clause without an output name replaces ``base``'s metric and threshold;
    ``command`` and ``check`` are the external check."""
    rule, overrides, whole = base, dict(base.outputs), None
    for spec in specs:
        output, parsed = parse_clause(str(spec).strip(), base)
        if output is None:
            if whole is not None and whole.bounded and parsed.bounded and whole != parsed:
                raise InputError(f"--accept {spec!r}: the rule of every output is already {whole.describe()!r}; one rule applies to "
                                 "all outputs (give a second bound for one output as 'OUTPUT: METRIC<=VALUE').")
            whole = parsed if whole is None or not whole.bounded else whole  # 'finite' with a bound: the bound (it implies finite)
        elif output in overrides and overrides[output] != parsed:
            raise InputError(f"--accept {spec!r}: output {output!r} has a rule already ({overrides[output].describe()}); give one per output.")
        else:
            overrides[output] = parsed
    if whole is not None:
        rule = replace(rule, metric=whole.metric, threshold=whole.threshold, atol=whole.atol)
    return replace(rule, outputs=tuple(overrides.items()), command=command or base.command, check=check or base.check)


def parse_clause(spec: str, base: Tolerance) -> tuple[str | None, Tolerance]:
    """(the output it names or None for every output, its rule) of one clause of the grammar."""
    finite = _FINITE.match(spec)
    if finite:
        return finite.group("output"), Tolerance(base.metric, -math.inf if base.metric in HIGHER_IS_BETTER else math.inf, base.atol)
    m = _BOUND.match(spec)
    if not m:
        raise InputError(f"--accept {spec!r}: {GRAMMAR}.")
    metric, op, value = m.group("metric"), m.group("op"), float(m.group("value"))
    if metric not in METRICS:
        raise InputError(f"--accept {spec!r}: " + unknown_metric(metric))
    want = ">=" if metric in HIGHER_IS_BETTER else "<="
    if op != want:
        raise InputError(f"--accept {spec!r}: the rule passes at its threshold, as compare's does, and {metric} is "
                         f"{'higher' if want == '>=' else 'lower'}-is-better: write {metric}{want}{value:g}.")
    if want == "<=" and value < 0:
        raise InputError(f"--accept {spec!r}: {metric} is never negative, so every output would fail; give a threshold >= 0, "
                         f"e.g. {metric}<={DEFAULT_TOLERANCES['fp16'].threshold if metric == 'rel_l2' else METRIC_DEFAULTS.get(metric, 0.01):g}.")
    given = m.group("atol") is not None
    atol = _atol(metric, value, float(m.group("atol")) if given else base.atol, given)
    return m.group("output"), Tolerance(metric, value, atol)


def unknown_metric(name: str) -> str:
    matches = close_matches(name, sorted(METRICS))
    return f"Unknown metric {name!r}; choose from {sorted(METRICS)}." + (f" Did you mean {matches[0]!r}?" if matches else "")


def nonfinite_differs(ref: np.ndarray, test: np.ndarray, nf_ref: NonFinite, nf_test: NonFinite) -> bool:
    if nf_ref == nf_test and nf_ref.total == 0:
        return False
    if nf_ref != nf_test:
        return True
    r, t = np.asarray(ref), np.asarray(test)
    return bool(np.any(np.isnan(r) != np.isnan(t)) or np.any(np.isinf(r) != np.isinf(t)))
