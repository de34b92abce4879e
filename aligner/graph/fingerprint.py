"""A model's content hash: what a plan was verified on, so ``+plan.json`` can tell another model apart.

The hash covers what decides the model's function: the opsets, the graph's inputs and outputs
(names and types), every node in order (op type, inputs, outputs, attributes and any subgraph
bodies; names included, since plans name nodes) and every initializer's name, type, shape and
*values*. It leaves out what re-saving or a converter may change without changing the function:
producer name and version, IR version, doc strings, model metadata (``aligner build``'s stamp
included) and how a tensor's values are stored (``raw_data`` or typed fields, inline or external
data). So ``onnx.save(onnx.load(m))`` and a copy saved with external data hash alike; any edited
weight, node or attribute does not.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

DIGEST_DESCRIPTION = ("sha256 of opsets, graph inputs/outputs, nodes (in order) and initializer values; "
                      "producer, IR version, doc strings, metadata and tensor storage ignored")


def model_digest(model: onnx.ModelProto) -> str:
    """The content hash of ``model`` (16 hex digits; see the module docstring for what it covers).
    Streams initializer by initializer: no 2 GiB protobuf limit."""
    h = hashlib.sha256()
    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        h.update(f"opset {opset[0]} {opset[1]}\n".encode())
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for v in values:
            h.update(f"{kind} {v.name} ".encode() + v.type.SerializeToString(deterministic=True) + b"\n")
    for node in graph.node:
        h.update(_node_bytes(node) + b"\n")
    for init in sorted(graph.initializer, key=lambda t: t.name):
        _update_tensor(h, init)
    for sparse in graph.sparse_initializer:
        h.update(b"sparse " + sparse.SerializeToString(deterministic=True))
    for function in model.functions:
        h.update(b"function " + function.SerializeToString(deterministic=True))
    return h.hexdigest()[:16]


def _node_bytes(node: onnx.NodeProto) -> bytes:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.doc_string = ""
    return copy.SerializeToString(deterministic=True)


def _update_tensor(h, tensor: onnx.TensorProto) -> None:
    h.update(f"init {tensor.name} {tensor.data_type} {list(tensor.dims)} ".encode())
    if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:  # not loaded: name where its bytes live
        h.update(b"external " + repr(sorted((e.key, e.value) for e in tensor.external_data if e.key != "location")).encode())
        return
    try:
        value = numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - a type numpy cannot hold: its stored form, without the name
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name, copy.doc_string = "", ""
        h.update(copy.SerializeToString(deterministic=True))
        return
    h.update(np.ascontiguousarray(value).tobytes())


__all__ = ["DIGEST_DESCRIPTION", "model_digest"]
