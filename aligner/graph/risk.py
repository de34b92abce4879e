"""Static FP16 risk scan: patterns and weights that commonly overflow or underflow in FP16."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aligner.graph.model import ModelGraph
from aligner.limits import FP16_MAX, FP16_MIN_NORMAL



@dataclass(frozen=True)
class Risk:
    node: str
    op_type: str
    reason: str


def fp16_risks(graph: ModelGraph) -> list[Risk]:
    """Nodes whose structure or weights make FP16 overflow or underflow likely."""
    risks = []
    for node in graph.nodes:
        consumers = [c.op_type for o in node.output for c in graph.consumers.get(o, [])]
        if node.op_type == "Pow":
            exponent = graph.constant(node.input[1]) if len(node.input) > 1 else None
            if exponent is not None and exponent.size == 1 and float(exponent) >= 2:
                where = " feeding ReduceMean (decomposed LayerNorm/variance)" if "ReduceMean" in consumers else ""
                risks.append(Risk(node.name, node.op_type, f"square of activations{where}: |x| > 256 overflows FP16"))
        elif node.op_type == "Exp":
            src = graph.producer.get(node.input[0])
            if src is None or src.op_type != "Sub":
                risks.append(Risk(node.name, node.op_type, "Exp without max subtraction: inputs > 11.1 overflow FP16"))
        elif node.op_type in ("ReduceSumSquare", "ReduceL2", "LpNormalization"):
            risks.append(Risk(node.name, node.op_type, "sum of squares: overflows FP16 for large activations"))
        elif node.op_type == "BatchNormalization" and len(node.input) >= 5:
            var = graph.constant(node.input[4])
            if var is not None and np.max(np.abs(var)) > FP16_MAX:
                risks.append(Risk(node.name, node.op_type, f"running variance up to {np.max(var):.3g} exceeds FP16 max {FP16_MAX:g}"))
        for name in node.input:
            if name in graph.initializers or (graph.producer.get(name) is not None and graph.producer[name].op_type == "Constant"):
                value = graph.constant(name)
                if value is None or value.dtype != np.float32 or value.size == 0:
                    continue
                finite = np.abs(value[np.isfinite(value)])
                if finite.size and finite.max() > FP16_MAX:
                    risks.append(Risk(node.name, node.op_type, f"constant {name!r} holds values up to {finite.max():.3g}: inf in FP16"))
                elif finite.size > 16 and np.mean((finite > 0) & (finite < FP16_MIN_NORMAL)) > 0.5:
                    risks.append(Risk(node.name, node.op_type, f"weight {name!r}: most values below {FP16_MIN_NORMAL:.2g} lose precision (subnormal) or flush in FP16"))
    return risks
