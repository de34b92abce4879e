"""``emu:fp16@fusions=ort``: the emulator with the fusions ONNX Runtime applies, and what capturing
does to them.

A fused kernel (a LayerNormalization ONNX Runtime made from a decomposed LayerNorm, a Conv+Relu,
a Gelu) reads its inputs as stored, computes inside in FP32 and stores only its outputs in the low
precision — what ONNX Runtime CUDA's and TensorRT's kernels do. The kernels are the ones ONNX
Runtime's CPU optimizer forms on the FP32 model (level ``extended``: fusions, no layout changes).
Capturing a tensor inside a kernel makes it a graph output and stops that fusion, as on the real
runtime: the runner then emulates that kernel unfused for that capture run, so CI sees the false
alarm a fusing GPU target would show and what the ``boundaries`` capture policy avoids.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from aligner.backends.base import InputInfo, capture_policy, check_capture, describe_model_inputs
from aligner.backends.emu.emulate import _internal_tensors, emulate_model
from aligner.backends.target import Target
from aligner.graph.model import ModelGraph

FUSION_PROFILES = {"ort": "ort:cpu:fp32@graph_optimization_level=extended,sandbox=0"}


class FusedEmuRunner:
    """The emulator of ``graph`` on ``target`` with the kernels of its ``fusions`` profile."""

    fuses = True

    def __init__(self, graph: ModelGraph, target: Target, keep_io_types: bool = True):
        from aligner.backends.ort.runner import OrtRunner
        from aligner.graph.deployed import kernels_of_onnx, map_deployed

        self.graph, self.target, self.label, self.keep_io = graph, target, str(target), keep_io_types
        profile = target.option_dict["fusions"]
        if profile not in FUSION_PROFILES:
            from aligner.errors import TargetError

            raise TargetError(f"Target {target}: fusions={profile!r}; known profiles: {', '.join(FUSION_PROFILES)}.")
        self._deployer = OrtRunner(graph.model, Target.parse(FUSION_PROFILES[profile]), optimize=True)
        self._deployed = self._deployer.optimized_model()
        mapped = map_deployed(graph, kernels_of_onnx(self._deployed), FUSION_PROFILES[profile])
        self.kernels = [frozenset(k.originals) for k in mapped.fused]
        self._inside = [_internal_tensors(graph, dict.fromkeys(k, 0)) for k in self.kernels]
        absorbed = frozenset().union(*self._inside) if self._inside else frozenset()
        self.input_names, self.output_names = list(graph.input_names), list(graph.output_names)
        self._every = frozenset(graph.activations()) | set(self.input_names)
        self.capture_policy = capture_policy(target)
        self.capturable = self._every - absorbed if self.capture_policy == "boundaries" else self._every
        self._current: tuple[frozenset[int], object] | None = None  # (kernels kept fused, their runner): one at a time, for memory

    def optimized_model(self) -> onnx.ModelProto:
        """The graph whose kernels are emulated (ONNX Runtime's optimized FP32 model)."""
        return self._deployed

    def _runner(self, capture: Sequence[str]):
        from aligner.backends.ort.runner import OrtRunner

        captured = set(capture)
        kept = frozenset(i for i, inside in enumerate(self._inside) if not (inside & captured))  # a captured inner tensor unfuses
        if self._current is None or self._current[0] != kept:
            model = emulate_model(self.graph, self.target.pins, self.target.precision, self.keep_io, [self.kernels[i] for i in sorted(kept)])
            options = {k: v for k, v in self.target.options if k not in ("fusions", "capture")}
            base = Target.parse(self.target.base, pins=self.target.pins, options=options)
            self._current = (kept, OrtRunner(model.model, base, optimize=False, label=self.label))
        return self._current[1]

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = check_capture(capture, self._every)
        return self._runner(capture).run(feeds, capture)

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        return self._runner(()).time(feeds, runs, warmup)

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return describe_model_inputs(self.graph.model)


__all__ = ["FUSION_PROFILES", "FusedEmuRunner"]
