"""Graph surgery for capture: expose intermediate tensors as outputs, extract subgraphs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import helper

from aligner.errors import InputError, unknown_name_message
from aligner.graph.model import ModelGraph, skeleton


def with_outputs(graph: ModelGraph, names: Sequence[str], replace: bool = False, base: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of the model (or of ``base``) whose graph outputs include ``names``.

    ``replace`` drops the original outputs, so the runtime can prune what no capture needs.
    """
    model = onnx.ModelProto()
    model.CopyFrom(base if base is not None else graph.model)
    existing = {o.name for o in model.graph.output}
    if replace:
        del model.graph.output[:]
        existing = set()
    for name in names:
        if name in existing:
            continue
        if name not in graph.tensors:
            raise InputError(unknown_name_message("tensor", name, graph.tensors))
        info = graph.tensors[name]
        if info.elem_type:
            shape = None if info.shape is None else [d if d is not None else None for d in info.shape]
            vi = helper.make_tensor_value_info(name, info.elem_type, shape)
        else:
            vi = helper.make_empty_tensor_value_info(name)
        model.graph.output.append(vi)
        existing.add(name)
    return model


def extract_subgraph(graph: ModelGraph, inputs: Iterable[str], outputs: Iterable[str]) -> onnx.ModelProto:
    """The standalone model computing ``outputs`` from ``inputs`` (initializers come along)."""
    inputs, outputs = list(inputs), list(outputs)
    for name in inputs + outputs:
        if name not in graph.tensors:
            raise InputError(unknown_name_message("tensor", name, graph.tensors))
    # onnx.utils.Extractor needs typed value_info for every boundary tensor.
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.value_info[:]
    for name, info in graph.tensors.items():
        if info.kind in ("activation", "constant") and info.elem_type:
            model.graph.value_info.append(helper.make_tensor_value_info(name, info.elem_type, info.shape))
    try:
        sub = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    except Exception as exc:  # onnx raises bare Exceptions for unreachable outputs
        raise InputError(f"Cannot extract a subgraph from {inputs} to {outputs}: {exc}") from None
    return sub


__all__ = ["with_outputs", "extract_subgraph", "skeleton"]
