"""What bisect concludes: typed results, root-cause classes and their plain-language reasons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from aligner.compare.discrete import DISCRETE_OPS  # noqa: F401 - re-exported (it lived here)
from aligner.compare.results import TensorDiff, json_float
from aligner.compare.tolerance import Tolerance
from aligner.limits import FP16_MIN_SUBNORMAL, LOW_MAX

Kind = Literal["local", "inherited", "nonfinite", "discrete"]


@dataclass(frozen=True)
class ValueRange:
    """Range of one reference tensor (what a node was given)."""

    tensor: str
    min: float
    max: float
    max_abs: float
    min_abs_nonzero: float

    @classmethod
    def of(cls, name: str, value: np.ndarray) -> "ValueRange":
        a = np.asarray(value)
        if a.size == 0 or a.dtype.kind not in "fiu":
            return cls(name, math.nan, math.nan, math.nan, math.nan)
        a = a.astype(np.float64, copy=False)
        finite = a[np.isfinite(a)]
        if finite.size == 0:
            return cls(name, math.nan, math.nan, math.nan, math.nan)
        nz = np.abs(finite[finite != 0])
        return cls(name, float(finite.min()), float(finite.max()), float(np.abs(finite).max()), float(nz.min()) if nz.size else 0.0)

    def to_dict(self) -> dict:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in vars(self).items()}


@dataclass(frozen=True)
class LocalError:
    """A node run alone on the target with the reference's values of its inputs."""

    node: str
    op_type: str
    index: int
    tensor: str  # its worst output
    metrics: dict[str, float]
    diverges: bool
    new_nonfinite: bool
    inputs: tuple[ValueRange, ...] = ()
    output: ValueRange | None = None
    kernel: str = ""  # run as the deployed kernel that computes it (with the kernel's other nodes), not alone
    kernel_nodes: tuple[str, ...] = ()  # the original nodes of that kernel

    def to_dict(self) -> dict:
        return {
            "node": self.node, "op_type": self.op_type, "index": self.index, "tensor": self.tensor,
            "metrics": {k: json_float(v) for k, v in self.metrics.items()},
            "diverges": self.diverges, "new_nonfinite": self.new_nonfinite,
            "inputs": [r.to_dict() for r in self.inputs],
        } | ({"kernel": self.kernel, "kernel_nodes": list(self.kernel_nodes)} if self.kernel else {})


@dataclass(frozen=True)
class Probe:
    """One step of the search: a target run capturing ``tensors`` tensors."""

    phase: str  # "outputs" and "frontier" (halving), "sweep", "all", "isolate", "uncaptured"
    tensors: int
    cut: int | None = None  # frontier: nodes before the cut
    node: str = ""  # frontier: the last node before the cut
    diverged: bool | None = None  # None: not judged (isolation runs, or the target failed)
    nonfinite: bool | None = None
    status: str = "ok"  # "ok" or "failed"
    error: str = ""
    perturbed: str = ""  # the capture changed the target's outputs: how
    swept: int = 0  # frontier: tensors captured along for the sweep (not the cut's own)
    index: int | None = None  # frontier: ``node``'s number in the graph (#, as in every verdict; ``cut`` counts compute nodes only)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class RootCause:
    node: str
    op_type: str
    index: int
    kind: Kind
    local_error: dict[str, float]
    reason: str

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["local_error"] = {k: json_float(v) for k, v in self.local_error.items()}
        return d


@dataclass(frozen=True)
class NonfiniteOrigin:
    node: str
    op_type: str
    index: int
    tensor: str
    inputs: tuple[ValueRange, ...]
    reason: str

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "index": self.index, "tensor": self.tensor,
                "inputs": [r.to_dict() for r in self.inputs], "reason": self.reason}


@dataclass(frozen=True)
class Repro:
    model: str
    inputs: str
    reference_model: str | None  # --target-model runs: the reference's version of the piece
    command: str
    reproduces: bool
    nodes: tuple[str, ...]

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["nodes"] = list(self.nodes)
        return d


@dataclass(frozen=True)
class FailureSite:
    """The first node (in topological order) whose presence makes the target fail."""

    node: str
    op_type: str
    index: int  # position among the compute nodes searched
    prefix_nodes: int  # nodes in the smallest failing prefix (the suspect is its last)
    message: str  # how the smallest failing prefix failed
    alone: bool | None  # the suspect alone, on reference inputs, fails too (None: not checked)
    runs: int  # target runs the search made
    repro: str | None = None  # the smallest failing prefix, saved as ONNX
    fixes: tuple[str, ...] = ()  # options tried on the whole model with which the target runs
    not_fixes: tuple[str, ...] = ()  # options tried with which it still fails

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "index": self.index, "prefix_nodes": self.prefix_nodes,
                "message": self.message, "fails_alone": self.alone, "runs": self.runs, "repro": self.repro,
                "fixes": list(self.fixes), "not_fixes": list(self.not_fixes)}

    def describe(self) -> str:
        alone = {True: "it fails on its own too (inputs from the reference)",
                 False: "on its own (inputs from the reference) it runs: the failure needs its context, "
                        "e.g. a fusion or optimizer pass over it and its neighbours",
                 None: "it was not run on its own"}[self.alone]
        return (f"The target fails once node {self.node!r} ({self.op_type}, #{self.index}) is in the graph: the first "
                f"{self.prefix_nodes - 1} nodes run, the first {self.prefix_nodes} fail ({self.runs} target runs); {alone}."
                + (f" The whole model runs with {' or with '.join(self.fixes)}." if self.fixes else "")
                + (f" Tried without success: {', '.join(self.not_fixes)}." if self.not_fixes else ""))


@dataclass(frozen=True)
class BisectResult:
    model: str
    target: str
    reference: str
    strategy: str  # as asked
    strategy_used: str  # what ran ("auto" resolves to all or frontier)
    nodes: int  # compute nodes in the order searched
    first_divergent: TensorDiff | None
    root_cause: RootCause | None
    nonfinite_origin: NonfiniteOrigin | None
    local_errors: tuple[LocalError, ...]  # isolated nodes, largest error first
    probes: tuple[Probe, ...]
    explanation: str
    outputs_diverge: bool
    tolerance: Tolerance = field(default_factory=Tolerance)  # the rule every tensor was judged by
    checked: str = ""  # what the evidence covers, in words (which tensors were compared, in how many runs)
    repro: Repro | None = None
    failed: str = ""  # the target failed to build or run: the message
    notes: tuple[str, ...] = field(default_factory=tuple)
    failure_site: FailureSite | None = None  # when the target failed: the node whose presence makes it fail

    @property
    def target_runs(self) -> int:
        return len(self.probes)

    @property
    def runs(self) -> dict[str, int]:
        """Target runs by what they were for: ``halving`` (the frontier's cuts and the outputs), ``sweep``
        (tensors the halving runs had no room for), ``all``, ``isolate``."""
        kinds = {"outputs": "halving", "frontier": "halving"}
        counts: dict[str, int] = {}
        for p in self.probes:
            counts[kinds.get(p.phase, p.phase)] = counts.get(kinds.get(p.phase, p.phase), 0) + 1
        return counts

    @property
    def diverged(self) -> bool:
        return self.outputs_diverge or self.first_divergent is not None

    def to_dict(self) -> dict:
        first = self.first_divergent
        return {
            "model": self.model, "target": self.target, "reference": self.reference,
            "strategy": self.strategy, "strategy_used": self.strategy_used, "nodes": self.nodes,
            "diverged": self.diverged, "tolerance": self.tolerance.to_dict(), "checked": self.checked,
            "first_divergent": None if first is None else {
                "tensor": first.tensor, "node": first.node, "op_type": first.op_type, "index": first.index,
                "metrics": {k: json_float(v) for k, v in first.metrics.items()}, "reason": first.reason,
            },
            "root_cause": None if self.root_cause is None else self.root_cause.to_dict(),
            "nonfinite_origin": None if self.nonfinite_origin is None else self.nonfinite_origin.to_dict(),
            "local_errors": [e.to_dict() for e in self.local_errors],
            "outputs_diverge": self.outputs_diverge,
            "target_runs": self.target_runs,
            "runs": self.runs,
            "probes": [p.to_dict() for p in self.probes],
            "repro": None if self.repro is None else self.repro.to_dict(),
            "failed": self.failed or None,
            "failure_site": None if self.failure_site is None else self.failure_site.to_dict(),
            "explanation": self.explanation,
            "notes": list(self.notes),
        }


# ---- classification --------------------------------------------------------------------------

def classify(op_type: str, local: LocalError | None, inputs_differ: bool, output_is_discrete: bool,
             redefined: bool = False, low_precision: bool = False) -> Kind:
    """Why the first divergent node diverges.

    ``inputs_differ``: its inputs on the target are not bit-identical to the reference (within
    tolerance, or the node would not be the first). A choice op fed such inputs is ``discrete``,
    unless the two graphs define it differently (``redefined``) or, at full precision, it still
    differs when run alone on the exact reference inputs (then the choice itself is computed wrong).
    """
    if local is not None and local.new_nonfinite:
        return "nonfinite"
    if (op_type in DISCRETE_OPS or output_is_discrete) and inputs_differ and not redefined:
        if low_precision or local is None or not local.diverges:
            return "discrete"
    if local is not None and local.diverges:
        return "local"
    return "inherited"


def nonfinite_reason(op_type: str, inputs: tuple[ValueRange, ...], output: ValueRange | None, precision: str) -> str:
    """Which input range made a node produce NaN/inf on the target, in one sentence."""
    limit = LOW_MAX.get(precision, math.inf)
    name = precision.upper()
    big = [r for r in inputs if r.max_abs > limit]
    if big:
        r = big[0]
        return f"input {r.tensor!r} reaches {r.max_abs:.3g}, beyond {name} max {limit:g}: it is already inf when stored in {name}"
    top = max((r.max_abs for r in inputs if not math.isnan(r.max_abs)), default=math.nan)
    out_max = output.max_abs if output is not None else math.nan
    if op_type == "Pow" and out_max > limit:
        return f"Pow of an input with max |x| {top:.3g}: the result reaches {out_max:.3g}, beyond {name} max {limit:g}"
    if op_type == "Exp" and out_max > limit:
        return f"Exp of inputs up to {inputs[0].max:.3g}: e^x reaches {out_max:.3g}, beyond {name} max {limit:g} (subtract the max first, as Softmax does)"
    if op_type in ("Div", "Reciprocal") and precision == "fp16":
        divisor = inputs[-1]
        if divisor.min_abs_nonzero < FP16_MIN_SUBNORMAL or divisor.min_abs_nonzero == 0:
            return f"{op_type} by values as small as {divisor.min_abs_nonzero:.3g}, which are 0 in FP16: x/0 gives inf or NaN"
    if op_type in ("Log", "Sqrt") and inputs and inputs[0].min_abs_nonzero < FP16_MIN_SUBNORMAL and precision == "fp16":
        return f"{op_type} of values as small as {inputs[0].min_abs_nonzero:.3g}, which flush to 0 in FP16"
    if out_max > limit:
        return f"{op_type} output reaches {out_max:.3g} on the reference (inputs max |x| {top:.3g}), beyond {name} max {limit:g}"
    return f"{op_type} produces NaN/inf on the target from finite inputs (inputs max |x| {top:.3g}, output max |x| {out_max:.3g} on the reference)"


__all__ = ["BisectResult", "DISCRETE_OPS", "FailureSite", "Kind", "LocalError", "NonfiniteOrigin", "Probe", "Repro", "RootCause", "ValueRange", "classify", "nonfinite_reason"]
