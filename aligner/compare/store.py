"""Keep captured reference tensors on disk (.npy per tensor, read back memory-mapped)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


class DiskStore:
    """One ``.npy`` per tensor, read back memory-mapped; ``index.json`` maps names to files."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, str] = {}

    def put(self, name: str, array: np.ndarray) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[-80:]
        fname = self._files.get(name) or f"{len(self._files):06d}_{safe}.npy"  # a tensor stored again keeps its file
        np.save(self.dir / fname, np.ascontiguousarray(array), allow_pickle=False)
        self._files[name] = fname

    def flush(self) -> None:
        (self.dir / "index.json").write_text(json.dumps(self._files))

    def get(self, name: str) -> np.ndarray:
        return np.load(self.dir / self._files[name], mmap_mode="r", allow_pickle=False)

    def __contains__(self, name: str) -> bool:
        return name in self._files
