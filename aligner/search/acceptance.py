"""When a precision trial passes: the one verdict rule (:class:`~aligner.compare.tolerance.Tolerance`)
on every output of every sample — an output passes exactly when compare would not call it
divergent — and then the rule's external check (a command, a callable, a task metric) on the
whole model. ``Acceptance`` is the same type under the name precision's API has always used."""

from __future__ import annotations

import math
import shlex
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aligner.compare.layerwise import diff_tensor
from aligner.compare.metrics import HIGHER_IS_BETTER
from aligner.compare.tolerance import Tolerance, default_tolerance

Acceptance = Tolerance
default_acceptance = default_tolerance


def check_outputs(rule: Tolerance, reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                  worst: dict[str, float] | None = None) -> str:
    """'' when no output of ``got`` diverges from ``reference`` under ``rule`` (each output by its
    own override, if any: :func:`~aligner.compare.layerwise.diff_tensor`, compare's judgement),
    else what failed first; ``worst`` (updated in place) collects each metric's worst value over
    the float outputs."""
    reason = ""
    for name, r in reference.items():
        tol = rule.for_output(name)
        diff = diff_tensor(r, got[name], tol)
        if worst is not None and np.asarray(r).dtype.kind == "f":
            for k, v in diff.metrics.items():
                v = v if not np.isnan(v) else math.inf
                worst[k] = max(worst.get(k, -math.inf), v) if k not in HIGHER_IS_BETTER else min(worst.get(k, math.inf), v)
        if diff.diverges and not reason:
            reason = f"output {name!r}: {_why(diff, tol)}"
    return reason


def _why(diff, tol: Tolerance) -> str:
    if diff.reason == "nonfinite":
        nf = diff.nonfinite_target
        return (f"NaN/inf where the reference has none (NaN {nf.nan}, +inf {nf.posinf}, -inf {nf.neginf})"
                if diff.new_nonfinite else "its NaN/inf pattern differs from the reference's")
    if diff.reason == "metric":
        return (f"{tol.metric} {diff.metrics[tol.metric]:.3g} and max_abs {diff.metrics['max_abs']:.3g} break "
                f"{tol.describe()}")
    return {"values": "integer values differ from the reference's"}.get(diff.reason, diff.reason)


def external_verdict(rule: Tolerance, model_of, runner) -> str:
    """'' when the rule's external check passes (or it has none), else why not: the task metric
    on ``runner``, then the callable and the command on the ONNX model ``model_of()`` builds."""
    if rule.task is not None:
        said = rule.task(runner)
        if said:
            return said
    if rule.check is None and not rule.command:
        return ""
    model = model_of()
    if rule.check is not None and not rule.check(model):
        return "the acceptance callable said no"
    if rule.command:
        import onnx

        with tempfile.TemporaryDirectory(prefix="aligner-accept-") as tmp:
            path = Path(tmp) / "mixed.onnx"
            onnx.save(model, str(path))
            cmd = rule.command.replace("{model}", shlex.quote(str(path)))
            done = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
                return f"--accept-cmd exited {done.returncode}: {tail[0][:200]}"
    return ""


__all__ = ["Acceptance", "check_outputs", "default_acceptance", "external_verdict"]
