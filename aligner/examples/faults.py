"""Fault injection: edits whose location is known, on real exported models (the tests' and the
benchmarks' ground truth; also a way for users to check aligner on their own models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import reference_runner
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs


def change_gather_index(path: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the model with one Gather's constant index changed (the seed's DETR fault): it still
    runs, with the same output shapes, but computes wrong. Returns (edited path, the Gather)."""
    graph = ModelGraph.load(path)
    feeds = make_inputs(graph)
    ref = reference_runner(graph).run(feeds)
    for node in graph.nodes:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        index = node.input[1]
        src = graph.producer.get(index)
        if index in graph.initializers:
            tensor = graph.initializers[index]
        elif src is not None and src.op_type == "Constant":
            tensor = src.attribute[0].t
        else:
            continue
        value = numpy_helper.to_array(tensor)
        if value.size != 1:
            continue
        for new in (int(value.ravel()[0]) + 1, int(value.ravel()[0]) - 1, -1):
            model = onnx.ModelProto()
            model.CopyFrom(graph.model)
            edited = ModelGraph(model)
            target = edited.initializers.get(index) or edited.producer[index].attribute[0].t
            target.CopyFrom(numpy_helper.from_array(np.array(new, dtype=value.dtype).reshape(value.shape), target.name))
            try:
                out = reference_runner(edited).run(feeds)
            except Exception:
                continue
            if all(o.shape == ref[k].shape for k, o in out.items()) and any(not np.allclose(o, ref[k]) for k, o in out.items()):
                path_out = tmp_path / "edited.onnx"
                onnx.save(edited.model, str(path_out))
                return path_out, node.name
    raise ValueError("no Gather index could be changed without breaking the model")


def _save(graph: ModelGraph, path: Path) -> Path:
    onnx.save(graph.model, str(path))
    return path


def scale_weight(path: Path, out: Path, op_type: str, factor: float, which: int = -1) -> tuple[Path, str]:
    """Scale the weight initializer (input 1) of the ``which``-th ``op_type`` node: with a large
    factor its output passes 65504 and overflows in FP16. Returns (scaled path, the node)."""
    graph = ModelGraph.load(path)
    victims = [n for n in graph.nodes if n.op_type == op_type and len(n.input) > 1 and n.input[1] in graph.initializers]
    victim = victims[which]
    weight = graph.initializers[victim.input[1]]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor), weight.name))
    return _save(graph, out), victim.name


def edit_constant(path: Path, out: Path, node_name: str, input_index: int, change) -> Path:
    """Replace the constant (initializer or Constant node) read by ``node_name`` at ``input_index``
    with ``change(old_array)``."""
    graph = ModelGraph.load(path)
    name = graph.node(node_name).input[input_index]
    src = graph.producer.get(name)
    tensor = graph.initializers[name] if name in graph.initializers else src.attribute[0].t
    old = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(change(old), dtype=old.dtype).reshape(old.shape), tensor.name))
    return _save(graph, out)


def change_attribute(path: Path, out: Path, op_type: str, attribute: str, value, which: int = 0) -> tuple[Path, str]:
    """Set ``attribute`` of the ``which``-th ``op_type`` node. Returns (edited path, the node)."""
    graph = ModelGraph.load(path)
    victim = [n for n in graph.nodes if n.op_type == op_type][which]
    kept = [a for a in victim.attribute if a.name != attribute]
    del victim.attribute[:]
    victim.attribute.extend(kept + [helper.make_attribute(attribute, value)])
    return _save(graph, out), victim.name


def inject_overflow_site(graph: ModelGraph, first: str, second: str, feeds: dict, margin: float = 4.0) -> float:
    """Make ``first`` (Conv or MatMul[+Add bias]) write values ``margin`` times past 65504 and undo
    it in ``second`` (a Conv/MatMul reached through a ReLU), so FP32 results are unchanged but the
    tensors between overflow in FP16. Edits ``graph`` in place; returns the scale used."""
    node = graph.node(first)
    out = node.output[0]
    peak = float(np.abs(reference_runner(graph).run(feeds, [out])[out]).max())
    scale = np.float32(margin * 65504.0 / peak)
    scaled = [node.input[1]] + ([node.input[2]] if node.op_type == "Conv" and len(node.input) > 2 else [])
    if node.op_type == "MatMul":  # the Linear's bias lives in the Add that follows
        add = graph.consumers[out][0]
        scaled += [x for x in add.input if x in graph.initializers]
    for name in scaled:
        t = graph.initializers[name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * scale, name))
    w = graph.initializers[graph.node(second).input[1]]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) / scale, w.name))
    return float(scale)


def overflowing_nodes(graph: ModelGraph, feeds: dict) -> set[str]:
    """The oracle: nodes that read or write a float value beyond 65504 on the reference (each must
    stay FP32, or it stores or reads inf)."""
    names = [n for n in graph.activations()]
    values = reference_runner(graph).run(feeds, names)
    big = {n for n, v in values.items() if v.dtype.kind == "f" and np.abs(v[np.isfinite(v)]).max(initial=0) > 65504}
    big |= {n for n, t in graph.initializers.items() if t.data_type == onnx.TensorProto.FLOAT and np.abs(numpy_helper.to_array(t)).max(initial=0) > 65504}
    return {n.name for n in graph.nodes if n.op_type != "Constant" and (set(n.output) & big or set(n.input) & big)}


def cancellation_model() -> onnx.ModelProto:
    """x -> Add 1000 ("shift") -> MatMul ("mm") -> Sub 1000*colsum(W) ("unshift") -> Relu -> MatMul ("head"):
    FP32 computes x @ W exactly enough; BF16 stores x + 1000 in steps of 4 (8 significant bits), so
    "unshift" cancels 1000-sized terms and keeps mostly rounding error: a BF16 precision fault whose
    place is known."""
    rng = np.random.default_rng(0)
    w, head = rng.normal(0, 0.125, (64, 64)).astype(np.float32), rng.normal(0, 0.125, (64, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(np.float32([1000.0]), "c"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array((1000.0 * w.sum(0)).astype(np.float32), "cw"), numpy_helper.from_array(head, "w2")]
    nodes = [helper.make_node("Add", ["x", "c"], ["s"], name="shift"), helper.make_node("MatMul", ["s", "w"], ["m"], name="mm"),
             helper.make_node("Sub", ["m", "cw"], ["u"], name="unshift"), helper.make_node("Relu", ["u"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "cancellation", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
