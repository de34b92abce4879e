"""The content hash of calibration data as stored: what an INT8 plan records, so ``+plan.json`` can
tell whether the data it calibrates on now is the data the search calibrated on.

It hashes the files of the source (:func:`aligner.quant.calib.calibration_files`: an .npz, a
Polygraphy JSON file, or a folder's .npz files in sorted order) byte by byte, with each file's name
inside a folder (the order of the samples): no array is loaded, so it costs one read of the files
whatever their size. Re-saving the same arrays with another numpy may change the bytes (then the
plan asks for a check it could have skipped; it never accepts other data).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from aligner.quant.calib import calibration_files

CHUNK = 1 << 20


def calibration_digest(source: str | Path) -> tuple[str, int]:
    """(16-hex-digit hash, number of files) of the calibration data at ``source``; a missing or empty
    source is :func:`calibration_files`' InputError."""
    files = calibration_files(source)
    root = Path(source)
    h = hashlib.sha256()
    for path in files:
        name = path.name if root.is_dir() else ""
        h.update(f"file {name} {path.stat().st_size}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16], len(files)


__all__ = ["calibration_digest"]
