"""The pin search as library functions over a check: no runtime here.

``check(pins, phase)`` builds and runs the target with ``pins`` kept in FP32 and returns a
:class:`Trial`. The search:

1. tries pure low precision (a model that passes needs no plan: one trial);
2. tries the seeds (nodes the reference's value ranges show cannot live in FP16); while that fails,
   *grows* the set by the trial's culprit (where NaN/inf or the divergence starts);
3. *minimises* the passing set by delta debugging (complements of chunks, then single pins) until
   removing any one pin makes the check fail: the result is 1-minimal.

A trial that fails to build or run (``error``) never counts as "passes"; it is kept apart in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Trial:
    pins: frozenset[str]
    passed: bool
    phase: str = ""  # "pure", "seed", "grow", "minimize", "final"
    metrics: dict[str, float] = field(default_factory=dict)
    culprit: str | None = None  # where it goes wrong under these pins (for growing)
    error: str = ""  # the target failed to build or run
    seconds: float = 0.0
    reason: str = ""  # why it failed, in words


Check = Callable[[frozenset[str], str], Trial]


def grow(seeds: Sequence[str], check: Check, limit: int) -> tuple[list[str], Trial, dict[str, int]]:
    """Pins that pass, starting from ``seeds``; adds each failing trial's culprit. Returns the
    pins, the last trial, and for each grown pin the number of the trial that named it."""
    pins = list(dict.fromkeys(seeds))
    grown: dict[str, int] = {}
    trial = check(frozenset(pins), "seed")
    steps = 0
    while not trial.passed and not trial.error and trial.culprit and trial.culprit not in pins and steps < limit:
        pins.append(trial.culprit)
        grown[trial.culprit] = steps
        steps += 1
        trial = check(frozenset(pins), "grow")
    return pins, trial, grown


def minimize(pins: Sequence[str], check: Check, coarse_above: int = 16) -> list[str]:
    """Delta debugging over a passing pin set: returns a subset that still passes and from which
    no single pin can be removed (1-minimal). Large sets start with halves (ddmin); small ones go
    straight to single removals, since seeds are mostly necessary."""
    current = list(pins)
    n = 2 if len(current) > coarse_above else max(len(current), 1)
    while current:
        n = min(n, len(current))
        chunks = _split(current, n)
        for chunk in chunks:
            drop = set(chunk)
            rest = [p for p in current if p not in drop]
            if check(frozenset(rest), "minimize").passed:
                current = rest
                n = max(n - 1, 2) if len(chunk) > 1 else n
                break
        else:
            if n >= len(current):
                break  # every single removal failed: 1-minimal
            n = min(2 * n, len(current))
    return current


def _split(items: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


def search_pins(seeds: Sequence[str], check: Check, grow_limit: int = 64) -> tuple[list[str], Trial | None]:
    """Pure low precision first, then seeds + growth, then minimisation. Returns (pins, the
    trial that verifies them) or (pins tried last, None) when nothing passed."""
    pure = check(frozenset(), "pure")
    if pure.passed:
        return [], pure
    start = list(seeds)
    if not start and pure.culprit:
        start = [pure.culprit]
    pins, trial, _ = grow(start, check, grow_limit)
    if not trial.passed:
        return pins, None
    pins = minimize(pins, check)
    return pins, check(frozenset(pins), "final")


__all__ = ["Check", "Trial", "grow", "minimize", "search_pins"]
