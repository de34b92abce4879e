"""Original tensors matched through Q/DQ pairs, and each node's quantized unit for isolation.

ONNX Runtime's QDQ quantizer keeps node names and quantizes a tensor ``T`` as
``T -> QuantizeLinear -> T_QuantizeLinear_Output -> DequantizeLinear -> T_DequantizeLinear_Output``
(a graph output ``T`` becomes ``T_QuantizeLinear_Input -> Q -> DQ -> T``). It also folds a Relu/Clip
into the quantization of its producer's output (the Conv then writes the Relu's tensor name, with
pre-activation values, and the Q/DQ clamps them). So a float tensor of the original model is
compared with the *dequantized* value of its Q/DQ pair, never with the raw tensor of the same name.

Capture takes the integer tensor (the QuantizeLinear output) and dequantizes it here with the
pair's scale and zero point: on ONNX Runtime's integer kernels that tensor is a kernel output
(QLinearConv writes it), so capturing it does not stop a fusion, whereas capturing a
DequantizeLinear output would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from aligner.graph.decouple import isolated_name
from aligner.graph.model import ModelGraph

Q, DQ = "QuantizeLinear", "DequantizeLinear"
_RENAMED_OUTPUT = "_QuantizeLinear_Input"


@dataclass(frozen=True)
class Dequantize:
    """How to read an original tensor on the QDQ model: capture ``quantized``, then (q - zero) * scale."""

    quantized: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def __call__(self, q: np.ndarray) -> np.ndarray:
        scale, zero = self.scale, self.zero_point.astype(np.int32)
        if scale.ndim == 1 and q.ndim > 1:  # per-axis
            shape = [1] * q.ndim
            shape[self.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return ((q.astype(np.int32) - zero).astype(np.float32) * scale).astype(np.float32)


class QdqMap:
    """Which tensor of the QDQ model ``qdq`` stands for each tensor of the original ``graph``."""

    def __init__(self, graph: ModelGraph, qdq: onnx.ModelProto):
        self.graph, self.qdq = graph, qdq
        self.inits = {t.name: t for t in qdq.graph.initializer}
        self.producer = {o: n for n in qdq.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in qdq.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.nodes = {n.name: n for n in qdq.graph.node}
        originals = set(graph.activations()) | set(graph.input_names)
        self.dequantized: dict[str, Dequantize] = {}
        for node in qdq.graph.node:
            if node.op_type != Q:
                continue
            original = node.input[0].removesuffix(_RENAMED_OUTPUT)
            dq = self._dq_after(node)
            if original in originals and dq is not None and original not in self.dequantized:
                self.dequantized[original] = self._dequantize(node.output[0], dq)
        # Tensors not quantized keep their name where the same node still writes them (a node kept in float).
        self.passthrough = frozenset(
            t for t in originals if t not in self.dequantized and t in self.producer
            and graph.producer.get(t) is not None and self.producer[t].name == graph.producer[t].name) \
            | frozenset(graph.input_names) | frozenset(graph.output_names)
        self.capturable = frozenset(self.dequantized) | self.passthrough

    def _dq_after(self, q: onnx.NodeProto) -> onnx.NodeProto | None:
        return next((c for c in self.consumers.get(q.output[0], []) if c.op_type == DQ), None)

    def _dequantize(self, quantized: str, dq: onnx.NodeProto) -> Dequantize:
        scale = numpy_helper.to_array(self.inits[dq.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(self.inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, np.int32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        return Dequantize(quantized, scale, zero, axis)

    def to_capture(self, names: Iterable[str]) -> list[str]:
        """The QDQ model's tensors to capture for these original tensors."""
        out = []
        for name in names:
            if name in self.passthrough:
                out.append(name)
            else:
                out.append(self.dequantized[name].quantized)
        return list(dict.fromkeys(out))

    def read(self, name: str, captured: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value of original tensor ``name`` from the captured QDQ tensors."""
        if name in self.passthrough:
            return captured[name]
        how = self.dequantized[name]
        return how(captured[how.quantized])

    def folded_into(self, name: str) -> "Unit | None":
        """The unit that computes node ``name`` when the quantizer folded it away (a Relu/Clip whose
        clamping became its producer's output quantization): the unit writing its output tensor."""
        for out in self.graph.node_by_name[name].output:
            how = self.dequantized.get(out)
            q = self.producer.get(how.quantized) if how is not None else None
            writer = self.producer.get(q.input[0]) if q is not None else None
            if writer is not None and writer.name in self.nodes and writer.name != name and writer.name in self.graph.node_by_name:
                return self.unit(writer.name)
        return None

    def kernel_node(self, name: str) -> str:
        """The node of the original graph whose quantized unit computes ``name`` (itself, or the producer
        a folded Relu/Clip became part of)."""
        unit = self.folded_into(name) if name not in self.nodes else None
        return unit.node if unit is not None else name

    # ---- isolation -------------------------------------------------------------------------------

    def unit(self, name: str) -> "Unit | None":
        """Node ``name`` as the quantized model computes it alone: the Q/DQ of its inputs, the node,
        the Q/DQ of its outputs; None when the quantizer removed the node (a Relu folded into its
        producer's output quantization) or it reads a tensor the reference does not have."""
        node = self.nodes.get(name)
        original = self.graph.node_by_name.get(name)
        if original is None:
            return None
        if node is None or node.op_type != original.op_type:
            kernel = self.folded_into(name)
            return replace(kernel, node=name) if kernel is not None else None
        nodes, feeds = [], {}  # feeds: tensor of the unit -> original tensor it is fed from
        for t in node.input:
            if not t or t in self.inits:
                continue
            src = self.producer.get(t)
            if src is not None and src.op_type == DQ:
                q = self.producer.get(src.input[0])
                if q is not None and q.op_type == Q:
                    feeds[q.input[0]] = q.input[0].removesuffix(_RENAMED_OUTPUT)
                    nodes += [q, src]
                elif src.input[0] in self.inits:
                    nodes.append(src)
                else:
                    feeds[src.input[0]] = src.input[0]
                    nodes.append(src)
            elif src is not None and src.op_type == "Constant":
                nodes.append(src)
            else:
                feeds[t] = t
        if any(orig not in self.graph.tensors for orig in feeds.values()):
            return None
        nodes.append(node)
        outputs = {}  # tensor of the unit -> original tensor it stands for
        for out in node.output:
            if not out:
                continue
            q = next((c for c in self.consumers.get(out, []) if c.op_type == Q), None)
            dq = self._dq_after(q) if q is not None else None
            original_name = out.removesuffix(_RENAMED_OUTPUT)
            if original_name not in self.graph.tensors:
                continue
            if dq is not None:
                nodes += [q, dq]
                outputs[dq.output[0]] = original_name
            else:
                outputs[out] = original_name
        return Unit(name, tuple(nodes), feeds, outputs)


@dataclass(frozen=True)
class Unit:
    """One original node as quantized: its nodes in the QDQ model, what feeds it, what it writes."""

    node: str
    nodes: tuple[onnx.NodeProto, ...]
    feeds: Mapping[str, str]  # unit tensor -> original tensor (reference value)
    outputs: Mapping[str, str]  # unit tensor -> original tensor it is compared with


def units_model(qmap: QdqMap, units: list[Unit], values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """One model running every unit on the reference values of its inputs (graph inputs named as the
    original tensors); unit ``u``'s output for original tensor ``T`` is ``isolated_name(T)``."""
    nodes, used_inits = [], set()
    for k, unit in enumerate(units):
        rename = {t: orig for t, orig in unit.feeds.items()}
        rename.update({t: isolated_name(orig) for t, orig in unit.outputs.items()})
        for src in unit.nodes:
            node = onnx.NodeProto()
            node.CopyFrom(src)
            node.name = f"{src.name}__unit{k}"
            for i, t in enumerate(node.input):
                if t in qmap.inits:
                    used_inits.add(t)
                elif t:
                    node.input[i] = rename.get(t, f"{t}__unit{k}")
            for i, t in enumerate(node.output):
                if t:
                    node.output[i] = rename.get(t, f"{t}__unit{k}")
            nodes.append(node)
    inputs = list(dict.fromkeys(orig for u in units for orig in u.feeds.values()))
    outputs = [isolated_name(orig) for u in units for orig in u.outputs.values()]
    graph = helper.make_graph(
        nodes, "aligner_int8_units",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(values[n]).dtype), np.shape(values[n])) for n in inputs],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [qmap.inits[n] for n in sorted(used_inits)])
    model = helper.make_model(graph, opset_imports=list(qmap.qdq.opset_import))
    model.ir_version = qmap.qdq.ir_version
    return model


__all__ = ["Dequantize", "QdqMap", "Unit", "units_model"]
