"""The Runner protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from aligner.backends.target import Target


class Runner(Protocol):
    """Runs one model on one target; returns the captured tensors, or the graph outputs when none are asked."""

    target: Target
    capturable: frozenset[str]  # tensor names this runner can capture

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]: ...
