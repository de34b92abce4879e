"""What ``aligner doctor`` returns: each step's status, summary, outputs and re-run command."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aligner.errors import TargetRunError

STEPS = ("inspect", "compare", "bisect", "precision", "build", "eval", "bench", "report")
Status = Literal["ok", "diverged", "passed", "failed", "skipped"]
Progress = Callable[[int, str, str], None]  # (step number from 1, step name, message)
OnStep = Callable[["Step", object], None]  # a finished step and what it returned (CompareResult, BisectResult, ...; None if skipped)


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: what it found, where it wrote, and the command that re-runs it."""

    name: str
    status: Status
    summary: str
    command: str = ""  # re-runs this step alone ("" for steps with no command of their own)
    outputs: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**vars(self), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class DoctorResult:
    model: str
    target: str
    out: str
    steps: tuple[Step, ...]
    diverged: bool
    fixed: bool | None  # None: nothing to fix; else whether a plan passed and its build passed the check
    report: str | None
    pins: int | None = None  # nodes the plan keeps in higher precision (None: no search ran)
    residual: str = ""  # with a passing plan, what still diverges inside (masked before the outputs)

    @property
    def exit_code(self) -> int:
        """0: the target agrees with the reference, or a verified plan and a checked build fix it; 1: it diverges and is not fixed."""
        return 1 if self.diverged and not self.fixed else 0

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "out": self.out, "diverged": self.diverged, "fixed": self.fixed,
                "report": self.report, "pins": self.pins, "residual": self.residual, "exit_code": self.exit_code, "steps": [s.to_dict() for s in self.steps]}


class StepError(TargetRunError):
    """A step whose target cannot run here (exit 3), with the steps done so far."""

    def __init__(self, number: int, name: str, cause: Exception, command: str, out: Path):
        again = f" Re-run it alone with: {command}" if command else ""
        super().__init__(f"step {number}/{len(STEPS)} ({name}) could not run: {cause} The steps before it are in {out}/.{again}")
        self.step = name


__all__ = ["DoctorResult", "OnStep", "Progress", "STEPS", "Status", "Step", "StepError"]
