"""Where the benchmarks write: ``benchmarks/work/`` (git-ignored), never the repository root.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``; the
models they build come from :mod:`aligner.examples.testmodels` (the tests' models, in the package).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"


def work_dir(prefix: str) -> Path:
    """A new folder under ``benchmarks/work/`` (absolute path), kept after the run for inspection."""
    WORK.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=WORK))


