"""Import optional dependencies inside functions, with one clear error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from aligner.errors import MissingDependencyError

_EXTRA_OF = {"torch": "torch", "pycocotools": "coco", "tensorrt": "tensorrt", "matplotlib": "report", "jinja2": "report", "faster_coco_eval": "coco", "PIL": "coco"}


def require(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependencyError(package or top, _EXTRA_OF.get(top, "dev"), purpose) from exc
