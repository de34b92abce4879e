"""ModelGraph: a loaded ONNX model with topological order, producers/consumers and tensor types.

Every node gets a stable identity: its own name when that is non-empty and unique, otherwise
``OpType(first_output)`` (exporters such as Paddle2ONNX leave names empty). The identity is
written into the working copy's ``node.name`` so every rewritten model derived from it (capture,
precision rewrite, emulation) names nodes the same way.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from aligner.errors import InputError, unknown_name_message
from aligner.graph.load import PROTOBUF_LIMIT, load_model, model_size

log = logging.getLogger(__name__)

Dim = int | str | None
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class TensorInfo:
    """Static facts about one tensor: element type and shape (symbolic dims kept as names)."""

    name: str
    elem_type: int  # onnx.TensorProto data type, 0 when unknown
    shape: tuple[Dim, ...] | None  # None when the rank is unknown
    kind: str  # "input" | "initializer" | "constant" | "activation"

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower() if self.elem_type else "unknown"

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape) or "scalar"


def node_keys(nodes: list[onnx.NodeProto]) -> list[str]:
    """Stable unique identity per node: its name if unique and non-empty, else OpType(output)."""
    counts = Counter(n.name for n in nodes if n.name)
    keys, seen = [], set()
    for i, node in enumerate(nodes):
        if node.name and counts[node.name] == 1:
            key = node.name
        else:
            anchor = next((o for o in node.output if o), f"#{i}")
            key = f"{node.op_type}({anchor})"
        while key in seen:
            key = f"{key}#{i}"
        seen.add(key)
        keys.append(key)
    return keys


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes ordered so producers come first; keeps the file order where it is already valid."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    waiting = defaultdict(list)
    missing_count = []
    ready = []
    for idx, node in enumerate(graph.node):
        missing = {t for t in _node_inputs(node) if t not in available}
        missing_count.append(len(missing))
        for t in missing:
            waiting[t].append(idx)
        if not missing:
            ready.append(idx)
    import heapq

    heapq.heapify(ready)
    order = []
    produced = set(available)
    while ready:
        idx = heapq.heappop(ready)
        order.append(graph.node[idx])
        for out in graph.node[idx].output:
            if out in produced:
                continue
            produced.add(out)
            for j in waiting.pop(out, []):
                missing_count[j] -= 1
                if missing_count[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) != len(graph.node):
        stuck = [n for n in graph.node if n not in order][:3]
        names = ", ".join(f"{n.op_type} {n.name!r}" for n in stuck)
        raise InputError(f"The graph has a cycle or reads tensors nobody produces (e.g. {names}).")
    return order


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including outer-scope tensors read by its subgraphs (If/Loop/Scan)."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in list(attr.g.node if attr.HasField("g") else []) + [n for g in attr.graphs for n in g.node]:
            names |= _node_inputs(sub)
        if attr.HasField("g") or attr.graphs:
            local = set()
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                local |= {i.name for i in g.input} | {i.name for i in g.initializer}
                local |= {o for n in g.node for o in n.output}
            names -= local
    return names


class ModelGraph:
    """An ONNX model prepared for analysis. Build with :meth:`load` or from a ModelProto."""

    def __init__(self, model: onnx.ModelProto, path: Path | None = None):
        self.path = path
        model = onnx.ModelProto.FromString(model.SerializeToString()) if model_size(model) < PROTOBUF_LIMIT else model
        self.model = model
        graph = model.graph
        ordered = topological_order(graph)
        del graph.node[:]
        graph.node.extend(ordered)
        for node, key in zip(graph.node, node_keys(list(graph.node))):
            node.name = key
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.node_by_name = {n.name: n for n in self.nodes}
        self.index_of = {n.name: i for i, n in enumerate(self.nodes)}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in _node_inputs(node):
                if name:
                    self.consumers[name].append(node)
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in graph.output]
        self.tensors = self._tensor_infos()

    def __getstate__(self) -> dict:
        """Pickled (for worker processes) as the serialized model and its path: the rest is rebuilt."""
        return {"model": self.model.SerializeToString(), "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(onnx.ModelProto.FromString(state["model"]), state["path"])

    @classmethod
    def load(cls, path: str | os.PathLike, check: bool = True) -> "ModelGraph":
        return cls(load_model(path, check=check), Path(path))

    # ---- queries -------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def node(self, name: str) -> onnx.NodeProto:
        if name not in self.node_by_name:
            raise InputError(unknown_name_message("node", name, self.node_by_name))
        return self.node_by_name[name]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise InputError(unknown_name_message("tensor", name, self.tensors))
        return self.tensors[name]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a parameter (an initializer or a Constant node's value), else None."""
        if name in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[name])
        src = self.producer.get(name)
        if src is not None and src.op_type == "Constant":
            value = next((a for a in src.attribute if a.name == "value" and a.HasField("t")), None)
            return onnx.numpy_helper.to_array(value.t) if value is not None else None
        return None

    def activations(self) -> list[str]:
        """Outputs of compute nodes in topological order (Constant nodes are parameters)."""
        return [o for n in self.nodes if n.op_type != "Constant" for o in n.output if o]

    def input_infos(self) -> list[TensorInfo]:
        return [self.tensors[n] for n in self.input_names]

    def op_histogram(self) -> Counter:
        return Counter(n.op_type for n in self.nodes)

    # ---- shapes and types ----------------------------------------------------------------
    def _tensor_infos(self) -> dict[str, TensorInfo]:
        inferred = infer_shapes(self.model)
        infos: dict[str, TensorInfo] = {}
        constants = {o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            kind = "input" if vi.name in self.input_names else "constant" if vi.name in constants else "activation"
            infos[vi.name] = TensorInfo(vi.name, *_type_and_shape(vi.type), kind=kind)
        for name, init in self.initializers.items():
            infos[name] = TensorInfo(name, init.data_type, tuple(init.dims), "initializer")
        for node in self.nodes:
            for out in node.output:
                if out and out not in infos:
                    infos[out] = TensorInfo(out, 0, None, "constant" if out in constants else "activation")
        return infos


def _type_and_shape(tp: onnx.TypeProto) -> tuple[int, tuple[Dim, ...] | None]:
    if not tp.HasField("tensor_type"):
        return 0, None
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return tt.elem_type, dims


def skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of the model whose large initializers keep name, type and dims but no data.

    Shape inference and graph surgery only need the metadata, and the copy stays far below the
    2 GiB protobuf limit whatever the model's size.
    """
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for init in model.graph.initializer:
        if init.ByteSize() <= keep_bytes:
            out.graph.initializer.append(init)
        else:
            out.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference on the model's skeleton (symbolic dims kept, any model size)."""
    from aligner.plugin import register_schemas

    register_schemas(model)  # plugin nodes have shapes too (their schemas register on first use)
    try:
        return onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: unknown shapes stay unknown
        log.warning("ONNX shape inference failed (%s); tensor shapes will be read at run time", exc)
        return model


def concrete_shapes(graph: ModelGraph, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Shape inference with the symbolic input dims fixed, e.g. to estimate capture memory."""
    fixed = skeleton(graph.model)
    for vi in fixed.graph.input:
        if vi.name in input_shapes:
            for d, size in zip(vi.type.tensor_type.shape.dim, input_shapes[vi.name]):
                d.Clear()
                d.dim_value = int(size)
    del fixed.graph.value_info[:]
    inferred = infer_shapes(fixed)
    return {vi.name: TensorInfo(vi.name, *_type_and_shape(vi.type), kind="activation")
            for vi in (*inferred.graph.value_info, *inferred.graph.output)}  # the outputs' shapes are inferred too


def numpy_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
