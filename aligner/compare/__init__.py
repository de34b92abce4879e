"""Metrics, tolerances and layer-wise comparison."""

from aligner.compare.layerwise import compare
from aligner.compare.results import CompareResult, TensorDiff
from aligner.compare.tolerance import Tolerance, default_tolerance

__all__ = ["compare", "CompareResult", "TensorDiff", "Tolerance", "default_tolerance"]
