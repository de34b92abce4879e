"""Import optional dependencies inside functions, with one clear error when missing.

``require`` imports a module where it is used. ``check`` asks only whether it could be imported
(``importlib.util.find_spec``: nothing is imported), so that a command that needs an extra can
say so before it does any work.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from aligner.errors import MissingDependencyError

# top-level module -> (pip package, extra of pyproject.toml that declares it)
_EXTRA_OF = {
    "torch": ("torch", "torch"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "tensorrt_rtx": ("tensorrt_rtx", "tensorrt"),
    "triton": ("triton", "tensorrt"),
    "faster_coco_eval": ("faster-coco-eval", "coco"),
    "onnxruntime_extensions": ("onnxruntime-extensions", "plugins"),
    "pynvml": ("nvidia-ml-py", "gpu"),
    "transformers": ("transformers", "dev"),
    "ray": ("ray", "ray"),
    "openvino": ("openvino", "openvino"),
}
# Core dependencies (pyproject.toml [project] dependencies): missing only from a broken install.
_CORE = {"pycocotools": "pycocotools", "PIL": "pillow", "matplotlib": "matplotlib", "jinja2": "jinja2",
         "pandas": "pandas", "rich": "rich", "onnx": "onnx", "onnxruntime": "onnxruntime",
         "cloudpickle": "cloudpickle"}


class MissingCoreDependencyError(MissingDependencyError):
    """A core dependency is missing: the install is incomplete (e.g. made with --no-deps)."""

    def __init__(self, package: str, purpose: str):
        Exception.__init__(self, f"{purpose} needs the Python package '{package}', a core dependency of aligner that is not "
                                 f"installed (an install made with --no-deps?). Install it with: pip install '{package}'")


def require(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(module, purpose, package) from exc


def check(module: str, purpose: str, package: str | None = None) -> None:
    """Raise MissingDependencyError now if ``module`` is not installed; imports nothing."""
    if not installed(module):
        raise missing(module, purpose, package)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a broken module
        return False


def missing(module: str, purpose: str, package: str | None = None) -> MissingDependencyError:
    """The error for a module that cannot be imported: the extra to install, or the core package."""
    top = module.split(".")[0]
    if top in _CORE:
        return MissingCoreDependencyError(package or _CORE[top], purpose)
    default_package, extra = _EXTRA_OF.get(top, (top, "dev"))
    return MissingDependencyError(package or default_package, extra, purpose)


__all__ = ["MissingCoreDependencyError", "check", "installed", "missing", "require"]
