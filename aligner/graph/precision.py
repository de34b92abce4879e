"""Precision rewrite: an FP16/BF16 copy of a model in which chosen nodes stay FP32.

The mixed model carries explicit Cast nodes at every FP32/low-precision boundary, which is how
TensorRT 10.12+/11 (strongly typed), TensorRT-RTX and ONNX Runtime all take mixed precision.

Rules (mirrored exactly by the ``emu:`` targets):
* An unpinned node reads every FP32-typed input in the low type and stores its float outputs in
  the low type; a pinned node reads FP32 and stores FP32. Casts are inserted where they differ,
  once per tensor.
* Integer, bool and double tensors are never touched.
* Inputs that an op's schema requires in FP32 (``Resize`` scales, ``NonMaxSuppression`` boxes...)
  stay FP32; ops whose schema has no low-precision kernel (``Range``...) and control-flow nodes
  are kept FP32 automatically, and reported.
* Control-flow bodies (``If``/``Loop``/``Scan`` subgraphs) are never rewritten: they compute in
  FP32, so every outer-scope FP32 tensor a body reads by name is given to it in FP32 (a Cast
  outside the node, and the body's references renamed to the cast).
* Initializers and Constant values are converted once; one shared by pinned and unpinned nodes is
  kept in FP32 for the pinned ones and duplicated in the low type for the others. Values outside
  the low type's range become inf, as they would on the GPU, and are reported, never clipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.errors import InputError, unknown_name_message
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.limits import LOW_MAX

log = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16"]
LOW_TYPE = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
LOW_TYPE_STR = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
DTYPE_ATTR_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike"}


@dataclass(frozen=True)
class Overflow:
    """A weight or constant with values outside the low type's range (they become inf)."""

    tensor: str
    max_abs: float
    count: int


@dataclass(frozen=True)
class RewriteResult:
    model: onnx.ModelProto
    precision: Precision
    pinned: tuple[str, ...]  # nodes kept in FP32 as asked
    auto_pinned: dict[str, str] = field(default_factory=dict)  # node -> why it had to stay FP32
    overflows: tuple[Overflow, ...] = ()
    casts_inserted: int = 0


@dataclass(frozen=True)
class NodeTyping:
    """How one node takes the low type: its FP32-only input slots, or why it cannot."""

    fp32_inputs: frozenset[int]
    unsupported: str | None = None


def node_typing(node: onnx.NodeProto, opset: int, precision: Precision) -> NodeTyping:
    """Read the op schema: which float inputs must stay FP32, and whether the op has a low kernel."""
    if node.op_type in CONTROL_FLOW:
        return NodeTyping(frozenset(), f"{node.op_type} has subgraphs; aligner keeps control flow in FP32")
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return NodeTyping(frozenset(), f"no ONNX schema for {node.domain or 'ai.onnx'}::{node.op_type}")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    low = LOW_TYPE_STR[precision]
    fp32_only = set()
    for i, name in enumerate(node.input):
        if not name or not schema.inputs:
            continue
        formal = schema.inputs[min(i, len(schema.inputs) - 1)]
        if formal.type_str == "tensor(float)":
            fp32_only.add(i)
        elif formal.type_str in allowed and "tensor(float)" in allowed[formal.type_str] and low not in allowed[formal.type_str]:
            return NodeTyping(frozenset(), f"{node.op_type} has no {precision} variant in the ONNX schema")
    for i, out in enumerate(node.output):
        if not out or not schema.outputs:
            continue
        formal = schema.outputs[min(i, len(schema.outputs) - 1)]
        types = allowed.get(formal.type_str, set())
        if "tensor(float)" in types and low not in types:
            return NodeTyping(frozenset(), f"{node.op_type} has no {precision} variant in the ONNX schema")
    return NodeTyping(frozenset(fp32_only))


def is_fp32(graph: ModelGraph, name: str) -> bool:
    """Whether ``name`` is an FP32 tensor (the only kind the rewrite and the emulator touch)."""
    info = graph.tensors.get(name) if name else None
    return info is not None and info.elem_type == TensorProto.FLOAT


def auto_pinned(graph: ModelGraph, typing: dict[str, NodeTyping]) -> dict[str, str]:
    """Nodes that touch FP32 tensors (their bodies' outer-scope reads included) but have no
    low-precision form, with the reason."""
    return {
        name: t.unsupported
        for name, t in typing.items()
        if t.unsupported and any(is_fp32(graph, x) for x in _node_inputs(graph.node_by_name[name]) | set(graph.node_by_name[name].output))
    }


def implicit_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors that ``node``'s subgraphs read by name (empty for a node without bodies)."""
    explicit = set(node.input)
    return sorted(n for n in _node_inputs(node) if n and n not in explicit)


def rename_in_bodies(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    """Make ``node``'s subgraphs (and theirs, recursively) read ``renames[x]`` where they read outer ``x``."""
    for attr in node.attribute:
        for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in body.node:
                inner.input[:] = [renames.get(x, x) for x in inner.input]
                rename_in_bodies(inner, renames)
            for out in body.output:  # a body may pass an outer tensor straight through (outputs are positional)
                out.name = renames.get(out.name, out.name)


def _value_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The ``value`` tensor of a Constant node (None for value_float(s)/value_int(s) forms)."""
    return next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)


def to_low(array: np.ndarray, precision: Precision) -> TensorProto:
    """Convert FP32 values to an FP16/BF16 TensorProto (round to nearest even, inf on overflow)."""
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return numpy_helper.from_array(array.astype(np.float16))
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(array), np.uint16(0x7FC0), rounded)
    tensor = helper.make_tensor("", TensorProto.BFLOAT16, array.shape, rounded.tobytes(), raw=True)
    return tensor


def _overflow(name: str, array: np.ndarray, precision: Precision) -> Overflow | None:
    limit = LOW_MAX[precision]
    finite = np.isfinite(array)
    big = np.abs(np.where(finite, array, 0)) > limit
    if big.any():
        return Overflow(name, float(np.abs(array[big]).max()), int(big.sum()))
    return None


class _Rewriter:
    def __init__(self, graph: ModelGraph, pinned: set[str], precision: Precision, keep_io_types: bool):
        self.g, self.precision, self.keep_io = graph, precision, keep_io_types
        self.low = LOW_TYPE[precision]
        self.typing = {n.name: node_typing(n, graph.opset, precision) for n in graph.nodes}
        self.auto = {k: v for k, v in auto_pinned(graph, self.typing).items() if k not in pinned}
        self.pinned = pinned | set(self.auto)
        self.storage: dict[str, int] = {}  # FP32-typed tensor -> its stored type in the rewrite
        self.casts: dict[tuple[str, int], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.new_inits: list[TensorProto] = []
        self.overflows: list[Overflow] = []

    def _is_fp32(self, name: str) -> bool:
        return is_fp32(self.g, name)

    def _needs(self, node: onnx.NodeProto, i: int) -> int:
        if node.name in self.pinned or i in self.typing[node.name].fp32_inputs:
            return TensorProto.FLOAT
        return self.low

    def run(self) -> RewriteResult:
        g = self.g
        for name in g.input_names:
            if self._is_fp32(name):
                self.storage[name] = TensorProto.FLOAT if self.keep_io else self.low
        self._convert_parameters()
        for node in g.nodes:
            if node.op_type == "Constant" and node.output[0] in self.storage:
                self.new_nodes.append(node)
                continue
            for i, name in enumerate(node.input):
                if self._is_fp32(name):
                    node.input[i] = self._read(name, self._needs(node, i))
            outer = {x: self._read(x, TensorProto.FLOAT) for x in implicit_inputs(node) if self._is_fp32(x)}
            rename_in_bodies(node, {x: y for x, y in outer.items() if x != y})  # bodies compute in FP32
            unpinned = node.name not in self.pinned
            for out in node.output:
                if self._is_fp32(out):
                    self.storage[out] = self.low if unpinned else TensorProto.FLOAT
            if unpinned:
                self._retype_attributes(node)
            self.new_nodes.append(node)
        self._fix_outputs()
        return self._finish()

    def _convert_parameters(self) -> None:
        """Initializers and Constant values: one copy per stored type that consumers need."""
        g = self.g
        params = {n: g.initializers[n] for n in g.initializers if self._is_fp32(n)}
        const_nodes = {n.output[0]: n for n in g.nodes if n.op_type == "Constant" and self._is_fp32(n.output[0])}
        for name in list(params) + list(const_nodes):
            needs = {self._needs(c, i) for c in g.consumers.get(name, []) for i, x in enumerate(c.input) if x == name}
            needs |= {TensorProto.FLOAT for c in g.consumers.get(name, []) if name in implicit_inputs(c)}  # read by a body
            if not needs or needs == {TensorProto.FLOAT}:
                self.storage[name] = TensorProto.FLOAT
                continue
            const = const_nodes.get(name)
            if const is not None and const.name in self.pinned:
                self.storage[name] = TensorProto.FLOAT
                continue
            tensor = params[name] if const is None else _value_tensor(const)
            if tensor is None:  # value_float(s) Constant: let the consumers cast it
                self.storage[name] = TensorProto.FLOAT
                continue
            array = numpy_helper.to_array(tensor)
            if (over := _overflow(name, array, self.precision)) is not None:
                self.overflows.append(over)
                log.warning("%s: %d value(s) up to %.3g exceed the %s range and become inf", name, over.count, over.max_abs, self.precision)
            low = to_low(array, self.precision)
            if needs == {self.low}:
                self.storage[name] = self.low
                low.name = name
                tensor.CopyFrom(low)  # the initializer or the Constant's value, in place
            else:
                self.storage[name] = TensorProto.FLOAT
                low.name = f"{name}__{self.precision}"
                self.new_inits.append(low)
                self.casts[(name, self.low)] = low.name

    def _read(self, name: str, want: int) -> str:
        if self.storage.get(name, TensorProto.FLOAT) == want:
            return name
        key = (name, want)
        if key not in self.casts:
            suffix = "fp32" if want == TensorProto.FLOAT else self.precision
            out = f"{name}__cast_{suffix}"
            self.new_nodes.append(helper.make_node("Cast", [name], [out], to=want, name=f"aligner/cast/{name}->{suffix}"))
            self.casts[key] = out
        return self.casts[key]

    def _retype_attributes(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = self.low
            elif node.op_type in DTYPE_ATTR_OPS and attr.name == "dtype" and attr.i == TensorProto.FLOAT:
                attr.i = self.low
            elif node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                low = to_low(numpy_helper.to_array(attr.t), self.precision)
                attr.t.CopyFrom(low)

    def _fix_outputs(self) -> None:
        graph = self.g.model.graph
        for vi in graph.output:
            if not self._is_fp32(vi.name) or self.storage.get(vi.name) != self.low:
                continue
            if not self.keep_io:
                vi.type.tensor_type.elem_type = self.low
                continue
            inner = f"{vi.name}__{self.precision}"
            for node in self.new_nodes:
                node.input[:] = [inner if x == vi.name else x for x in node.input]
                node.output[:] = [inner if x == vi.name else x for x in node.output]
            # named apart from a read cast of the same tensor (a graph output that an FP32 node also reads)
            self.new_nodes.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT, name=f"aligner/cast/{vi.name}->fp32 (output)"))

    def _finish(self) -> RewriteResult:
        graph = self.g.model.graph
        for vi in graph.input:
            if vi.name in self.g.input_names and self.storage.get(vi.name) == self.low:
                vi.type.tensor_type.elem_type = self.low
        del graph.node[:]
        graph.node.extend(self.new_nodes)
        graph.initializer.extend(self.new_inits)
        del graph.value_info[:]
        casts = sum(1 for n in self.new_nodes if n.name.startswith("aligner/cast/"))
        pinned = tuple(n.name for n in self.g.nodes if n.name in self.pinned and n.name not in self.auto)
        return RewriteResult(self.g.model, self.precision, pinned, dict(self.auto), tuple(self.overflows), casts)


def check_nodes(graph: ModelGraph, names: Iterable[str]) -> set[str]:
    """The node names as a set; an unknown name raises with the closest matches."""
    names = set(names)
    for name in names:
        if name not in graph.node_by_name:
            raise InputError(unknown_name_message("node", name, graph.node_by_name))
    return names


def rewrite_precision(
    graph: ModelGraph,
    fp32_nodes: Iterable[str] = (),
    precision: Precision = "fp16",
    keep_io_types: bool = True,
) -> RewriteResult:
    """Return an FP16/BF16 model in which ``fp32_nodes`` (node names) stay FP32."""
    if precision not in LOW_TYPE:
        raise InputError(f"Unknown precision {precision!r}; use one of {sorted(LOW_TYPE)}.")
    pinned = check_nodes(graph, fp32_nodes)
    work = ModelGraph(graph.model, graph.path)  # a private copy: the rewrite edits nodes in place
    return _Rewriter(work, pinned, precision, keep_io_types).run()


BUILT_PRECISION = "aligner.precision"  # metadata key aligner build stamps on a rewritten model


def built_precision(model: onnx.ModelProto) -> str | None:
    """The precision ``aligner build`` rewrote ``model`` to (its metadata), or None: runners take
    such a model as it is instead of rewriting it again (a second rewrite would undo its FP32 pins)."""
    return next((p.value for p in model.metadata_props if p.key == BUILT_PRECISION), None)
