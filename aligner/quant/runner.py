"""The runner of INT8 targets: the QDQ model on ONNX Runtime, read back in the original's tensor names.

``ort:cpu:int8`` runs the QDQ model as deployed (graph optimizations on: ONNX Runtime fuses
DQ -> op -> Q into its integer kernels, QLinearConv, QLinearMatMul, ...); ``emu:int8`` runs the same
model with optimizations off, so every Q/DQ is evaluated in float: exact fake quantization, the
error quantization itself causes, without the integer kernels' own (requantization, 16-bit
accumulation on CPUs without VNNI). Captures name original tensors and return their dequantized
values (:mod:`aligner.quant.match`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from aligner.backends.base import InputInfo, capture_policy, check_capture
from aligner.backends.target import Target
from aligner.errors import TargetError
from aligner.graph.fingerprint import model_digest
from aligner.graph.model import ModelGraph
from aligner.quant.match import QdqMap
from aligner.quant.quantize import QuantizedModel, quantize, session_target

log = logging.getLogger(__name__)


class Int8Runner:
    """``graph`` quantized for ``target`` (its pins kept in float), or ``qdq`` (a QDQ model of ``graph``
    quantized elsewhere, run as it is), on the target's runtime, read back in ``graph``'s tensor names."""

    def __init__(self, graph: ModelGraph, target: Target, qdq: ModelGraph | None = None):
        self.target, self.label = target, str(target)
        self.quantized: QuantizedModel | None = quantize(graph, target) if qdq is None else None  # None: ``qdq`` given, made elsewhere
        model = self.quantized.model if qdq is None else qdq.model
        self.model_sha = model_digest(model)  # the QDQ model it runs: a plan's replay runs the one the search verified
        log.info("%s runs the QDQ model with content sha %s", self.label, self.model_sha)
        self.map = QdqMap(graph, model)
        self._runner = qdq_runner(model, target, graph.path if qdq is None else qdq.path, self.label)
        self.input_names, self.output_names = list(graph.input_names), list(graph.output_names)
        # Every tensor offered is a kernel output of the deployed graph (see match.py), so "boundaries" is "all" here.
        self.capture_policy = "outputs" if capture_policy(target) == "outputs" else "all"
        self.capturable = self.map.capturable if self.capture_policy == "all" else frozenset(self.output_names) | set(self.input_names)
        self.fuses = self._runner.fuses  # captures are checked against an uncaptured run

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = check_capture(capture, self.capturable)
        if not capture:
            return self._runner.run(feeds)
        values = self._runner.run(feeds, self.map.to_capture(capture))
        return {name: self.map.read(name, values) for name in capture}

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        return self._runner.time(feeds, runs, warmup)

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return self._runner.describe_inputs()


def matched_qdq(graph: ModelGraph, other: ModelGraph, target: Target) -> "Int8Runner | None":
    """``other`` (``--target-model``) as a QDQ model of the float ``graph`` made by any quantizer, run on
    INT8 ``target`` and read through its Q/DQ pairs in ``graph``'s tensor names (dequantized), or
    None when that is not the case (then ``other`` runs as a second graph, tensors matched by name)."""
    if not target.is_quantized or other is graph or prequantized(graph.model) or not prequantized(other.model):
        return None
    refuse_pins(target, other)
    return Int8Runner(graph, target, qdq=other)


def refuse_pins(target: Target, qdq: ModelGraph) -> None:
    """Nodes kept in float are an instruction to aligner's quantizer: on a model quantized already they mean nothing."""
    if target.pins:
        raise TargetError(f"Target {target}: {qdq.path or 'the model'} is quantized already (Q/DQ nodes); nodes kept in float apply "
                          "when aligner quantizes the float model. Give the float model, or drop the +plan/pins.")


def prequantized(model) -> bool:
    """Whether ``model`` is quantized already: built by ``aligner build`` for an INT8 target (its
    stamp), or holding QuantizeLinear/DequantizeLinear nodes (a QDQ model made elsewhere)."""
    from aligner.graph.precision import built_precision

    return built_precision(model) == "int8" or any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def qdq_runner(qdq, target: Target, path=None, label: str | None = None):
    """The runner of a QDQ model as it is, on ``target``'s runtime: its descriptor's ``qdq_runner``
    (TensorRT: the Q/DQ define where it runs INT8, built strongly typed; OpenVINO: its integer kernels),
    else ONNX Runtime's session (optimized where the runtime optimizes: ``ort``, its integer kernels on
    CPU; not optimized for ``emu``: Q/DQ in float)."""
    from aligner.backends.registry import backend_of

    runtime = backend_of(target)
    if runtime.qdq_runner is not None:
        return runtime.qdq_runner(qdq, target, path, label)
    from aligner.backends.ort.runner import OrtRunner

    return OrtRunner(qdq, session_target(target), optimize=runtime.optimizes(target), label=label or str(target))


def check_tensorrt_qdq(qdq, target: Target) -> None:
    """TensorRT takes signed INT8 Q/DQ with zero points 0 and float biases: a QDQ model made for
    ONNX Runtime's CPU (u8 activations, int32 biases) is named as such, not left to its parser."""
    from onnx import TensorProto

    inits = {t.name: t for t in qdq.graph.initializer}
    bad = set()
    for node in qdq.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None and zero.data_type == TensorProto.UINT8:
            bad.add("uint8 zero points (asymmetric u8 activations)")
        source = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and source is not None and source.data_type == TensorProto.INT32:
            bad.add("int32 DequantizeLinear (quantized biases)")
    if bad:
        raise TargetError(f"Target {target}: this QDQ model has {' and '.join(sorted(bad))}, which TensorRT does not take. Quantize the "
                          f"float model for TensorRT instead: --target {target.base} --calib ... (s8s8, symmetric, float biases).")


__all__ = ["Int8Runner", "matched_qdq", "prequantized", "qdq_runner", "refuse_pins"]
