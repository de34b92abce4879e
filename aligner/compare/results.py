"""Typed, frozen results of a layer-wise comparison, convertible to a table, JSON and CSV."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aligner.compare.metrics import NonFinite
from aligner.compare.tolerance import Tolerance


@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared: where it comes from, how far apart the two sides are, the verdict."""

    tensor: str
    node: str
    op_type: str
    index: int  # topological index of the producing node in the reference model
    shape: tuple[int, ...]
    dtype: str
    metrics: dict[str, float]
    nonfinite_ref: NonFinite
    nonfinite_target: NonFinite
    diverges: bool
    reason: str = ""  # why it diverges: "nonfinite", "metric", "shape", "values"
    kernel: str = ""  # the deployed kernel that writes it, where the target fuses (see compare.capture)
    perturbed: str = ""  # its capture run moved the target's outputs enough to explain its verdict: how (labelled, not blamed)
    capture_effect: float = 0.0  # rel_l2 by which its capture run moved the target's outputs (0: not at all, or within noise)

    @property
    def new_nonfinite(self) -> bool:
        return self.nonfinite_target.total > 0 and self.nonfinite_ref.total == 0

    @property
    def blamed(self) -> bool:
        """Diverges in a capture that did not change what the target computes."""
        return self.diverges and not self.perturbed

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "node": self.node,
            "op_type": self.op_type,
            "index": self.index,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "metrics": {k: json_float(v) for k, v in self.metrics.items()},
            "nonfinite": {"reference": vars(self.nonfinite_ref), "target": vars(self.nonfinite_target)},
            "diverges": self.diverges,
            "reason": self.reason,
            "kernel": self.kernel,
            "perturbed": self.perturbed,
            "capture_effect": json_float(self.capture_effect),
        }


def json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")


@dataclass(frozen=True)
class CompareResult:
    reference: str
    target: str
    model: str
    target_model: str | None
    tolerance: Tolerance
    tensors: tuple[TensorDiff, ...]
    unmatched: tuple[str, ...] = ()  # reference tensors the target does not have
    notes: tuple[str, ...] = field(default_factory=tuple)
    capture: str = "all"  # the capture policy: boundaries, all, outputs
    kernels: tuple = ()  # fused kernels of the deployed graph (graph.deployed.Kernel), where known
    absorbed: tuple[str, ...] = ()  # tensors that exist only inside fused kernels: not captured

    @property
    def diverging(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.blamed]

    @property
    def perturbed(self) -> list[TensorDiff]:
        """Tensors whose capture changed the target's outputs: what they show is not what is deployed."""
        return [t for t in self.tensors if t.perturbed]

    @property
    def first_divergent(self) -> TensorDiff | None:
        return next((t for t in self.tensors if t.blamed), None)

    @property
    def first_nonfinite(self) -> TensorDiff | None:
        """The first tensor with NaN/inf on the target where the reference has none."""
        return next((t for t in self.tensors if t.new_nonfinite and not t.perturbed), None)

    def verdict(self) -> str:
        first = self.first_divergent
        if first is None:
            clean = len(self.tensors) - len(self.perturbed)
            text = (f"No divergence: {clean} tensors of {self.target} match {self.reference} within {self.tolerance.describe()}" if clean else
                    f"Nothing judged: every capture run changed {self.target}'s outputs, so no tensor shows what it deploys "
                    f"(capture=boundaries compares the deployed graph's tensors)")
        else:
            text = (
                f"{len(self.diverging)} of {len(self.tensors)} tensors diverge; the first is {first.tensor!r} "
                f"from {first.op_type} node {first.node!r} (#{first.index}) (tolerance {self.tolerance.describe()})"
            )
            kernel = next((k for k in self.kernels if k.name == first.kernel), None)
            if kernel is not None and kernel.fused:
                text += (f"; it is written by the fused kernel {kernel.op_type} {kernel.name!r}, which computes {len(kernel.originals)} nodes "
                         f"({', '.join(kernel.originals[:4])}{', ...' if len(kernel.originals) > 4 else ''})")
            nf = self.first_nonfinite
            if nf is not None:
                text += f"; NaN/inf first appear at {nf.op_type} node {nf.node!r} (#{nf.index})"
        vouched = [t for t in self.diverging if t.capture_effect > 0]
        if vouched:
            text += (f"; {len(vouched)} diverging tensor(s) were captured in runs that moved {self.target}'s outputs (by rel_l2 up "
                     f"to {max(t.capture_effect for t in vouched):.3g}): their divergence is far beyond what that explains, so they are blamed")
        if self.perturbed:
            bad = [t for t in self.perturbed if t.diverges]
            text += (f"; {len(self.perturbed)} tensor(s) were captured in runs that changed the target's outputs (capturing them stops "
                     f"a fusion): labelled, not blamed" + (f" — {len(bad)} of them diverge, first {bad[0].tensor!r}: what the target "
                                                           "would compute if that fusion were lost" if bad else ""))
        return text + "."

    def to_dict(self) -> dict:
        first = self.first_divergent
        nf = self.first_nonfinite
        brief = lambda t: None if t is None else {"tensor": t.tensor, "node": t.node, "op_type": t.op_type, "index": t.index}  # noqa: E731
        return {
            "reference": self.reference,
            "target": self.target,
            "model": self.model,
            "target_model": self.target_model,
            "tolerance": self.tolerance.to_dict(),
            "tensors": [t.to_dict() for t in self.tensors],
            "summary": {
                "first_divergent": brief(first),
                "first_nonfinite": brief(nf),
                "diverging": len(self.diverging),
                "compared": len(self.tensors),
                "unmatched": list(self.unmatched),
            },
            "notes": list(self.notes),
            "capture": self.capture,
            "fused_kernels": [k.to_dict() for k in self.kernels],
            "absorbed": len(self.absorbed),
            "perturbed": [t.tensor for t in self.perturbed],
        }

    def to_frame(self):
        """A pandas DataFrame, one row per tensor in topological order."""
        import pandas as pd

        rows = []
        for t in self.tensors:
            row = {"index": t.index, "tensor": t.tensor, "node": t.node, "op_type": t.op_type, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype}
            row.update(t.metrics)
            row.update({"nan_ref": t.nonfinite_ref.nan, "inf_ref": t.nonfinite_ref.posinf + t.nonfinite_ref.neginf})
            row.update({"nan_target": t.nonfinite_target.nan, "inf_target": t.nonfinite_target.posinf + t.nonfinite_target.neginf})
            row.update({"diverges": t.diverges, "reason": t.reason, "kernel": t.kernel, "perturbed": t.perturbed})
            rows.append(row)
        return pd.DataFrame(rows)
