"""Errors raised by aligner. The CLI prints them without a traceback and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AlignerError(Exception):
    """Base class: a problem the user can fix (bad input, missing dependency, unknown name)."""

    exit_code = 2


class ModelLoadError(AlignerError):
    """The model file is missing, not ONNX, truncated, or invalid."""


class InputError(AlignerError):
    """Input tensors do not match the model (names, shapes, dtypes, files)."""


class TargetError(AlignerError):
    """A target spec is unknown or the target cannot be built on this machine."""


class PlanError(InputError):
    """A plan does not replay here: another model than the one it was verified on, or its calibration
    data missing, changed or replaced (:mod:`aligner.backends.replay`)."""


class MissingDependencyError(AlignerError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed. "
            f"Install it with: pip install 'aligner[{extra}]'"
        )


class TargetRunError(AlignerError):
    """The target failed to build or run (not an accuracy failure)."""

    exit_code = 3


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Names in ``known`` that look like ``name`` (difflib, then substring matches)."""
    known = list(known)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if len(matches) < n:
        lowered = name.lower()
        matches += [k for k in known if lowered in k.lower() and k not in matches][: n - len(matches)]
    return matches


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """'Unknown tensor 'x'. Did you mean: a, b?' with a count of what is available."""
    known = list(known)
    matches = close_matches(name, known)
    hint = f" Did you mean: {', '.join(repr(m) for m in matches)}?" if matches else ""
    return f"Unknown {kind} {name!r} ({len(known)} {kind}s in the model).{hint}"
