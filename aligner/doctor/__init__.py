"""``doctor``: the demo's pipeline on the user's own model, one step after another.

inspect (static FP16 risks) → compare (the target against the reference, every tensor) → bisect
(first divergent node, its root cause, a standalone repro) → precision (the smallest verified set
of nodes kept in FP32, or in float for INT8) → build (the deployable model, checked against FP32)
→ eval (with a task metric, :class:`~aligner.doctor.task.CocoEval`: COCO AP of FP32, the pure low
precision and the plan; the plan is then searched with that AP as its acceptance) → bench (its
speed beside FP32 and the pure low precision) → one HTML report. ``aligner demo`` is this on the
built-in example detector with its val split (:func:`~aligner.doctor.task.example_coco`).

Every step writes under ``out`` (a run directory per step in ``out/runs/``) and records the command
that re-runs it alone on the same inputs (``out/inputs.npz``, the first sample: compare, bisect,
build and bench run it; with several samples, ``out/samples/`` holds them all and precision
searches on all of them). A step whose target cannot run here
(no GPU, a missing extra) stops the pipeline with :class:`StepError` (exit 3) naming the step;
a bench that fails is recorded and the rest goes on (speed is information, not a verdict).
"""

from aligner.doctor.result import STEPS, DoctorResult, Step, StepError
from aligner.doctor.run import doctor
from aligner.doctor.task import CocoEval, example_coco

__all__ = ["CocoEval", "DoctorResult", "STEPS", "Step", "StepError", "doctor", "example_coco"]
