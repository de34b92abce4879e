"""aligner: precision debugging and accuracy alignment for ONNX deployments.

``import aligner`` stays light: torch, tensorrt, pycocotools and matplotlib are imported only by
the functions that need them.
"""

from aligner.backends import InputInfo, Runner, make_runner, parse_target, reference_runner
from aligner.backends.target import Target
from aligner.bench import BenchResult, BenchRow, bench
from aligner.build import BuildCheck, BuildResult, build
from aligner.compare import CompareResult, TensorDiff, Tolerance, compare
from aligner.compare.torch_compare import TorchCompareResult, compare_torch
from aligner.errors import AlignerError, InputError, MissingDependencyError, ModelLoadError, TargetError, TargetRunError
from aligner.graph.capture import extract_subgraph, with_outputs
from aligner.graph.load import load_model
from aligner.graph.model import ModelGraph
from aligner.graph.precision import RewriteResult, rewrite_precision
from aligner.inputs import load_inputs, make_inputs, save_inputs
from aligner.search import BisectResult, bisect
from aligner.search.plan import PrecisionPlan
from aligner.search.precision import Acceptance, search_precision
from aligner.tune import TuneResult, TuneSettings, tune

from aligner.version import __version__  # noqa: F401 - re-exported: one place (aligner.version)

__all__ = [
    "Acceptance", "AlignerError", "BenchResult", "BenchRow", "BisectResult", "BuildCheck", "BuildResult", "CompareResult", "InputError",
    "InputInfo", "MissingDependencyError", "ModelGraph", "ModelLoadError", "PrecisionPlan", "RewriteResult", "Runner", "Target",
    "TargetError", "TargetRunError", "TensorDiff", "Tolerance", "TorchCompareResult",
    "bench", "bisect", "build", "compare", "compare_torch", "extract_subgraph", "load_inputs", "load_model", "make_inputs", "make_runner",
    "parse_target", "reference_runner", "rewrite_precision", "save_inputs", "search_precision", "tune", "with_outputs",
    "TuneResult", "TuneSettings",
]
