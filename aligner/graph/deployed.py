"""The deployed graph: which original nodes each kernel of an optimized graph computes.

A runtime that fuses (ONNX Runtime's optimizers, TensorRT) keeps only some of the original
tensors: those at kernel boundaries. The map is built from tensor names, which both ONNX
Runtime's optimized model and TensorRT's layer information keep for the tensors they keep:

* an original tensor that still exists in the deployed graph is a *boundary*: the deployed node
  that writes it computes the original node that wrote it;
* an original node none of whose outputs survive was absorbed: it belongs to the kernel that
  writes the first surviving tensor downstream of it (following consumers in the original graph);
* where the runtime lists the original nodes of each kernel (TensorRT's layer information, in
  each layer's Metadata), that list decides, and the names only fill the gaps.

Capturing a boundary tensor does not change what the runtime computes (it is already a kernel
output); capturing an absorbed one makes it a graph output and can stop the fusion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from aligner.errors import InputError
from aligner.graph.model import ModelGraph


@dataclass(frozen=True)
class Kernel:
    """One node of the deployed graph and the original nodes it computes."""

    name: str
    op_type: str
    originals: tuple[str, ...]  # original nodes, topological order
    outputs: tuple[str, ...]  # original tensors it writes (its boundary)
    precision: str = ""  # the precision the runtime ran it in, where the runtime says (OpenVINO's runtimePrecision)

    @property
    def fused(self) -> bool:
        return len(self.originals) > 1

    def to_dict(self) -> dict:
        out = {"name": self.name, "op_type": self.op_type, "originals": list(self.originals), "outputs": list(self.outputs)}
        return out | ({"precision": self.precision} if self.precision else {})


@dataclass(frozen=True)
class DeployedGraph:
    """What a runtime actually computes, mapped back onto the original graph."""

    runtime: str  # e.g. "ort:cpu:fp16 (ORT_ENABLE_ALL)"
    kernels: tuple[Kernel, ...]
    boundaries: frozenset[str]  # original tensors that exist in the deployed graph
    kernel_of: Mapping[str, str] = field(default_factory=dict)  # original node -> kernel name
    node_outputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # original node -> its output tensors
    fp32_fallback: int = 0  # nodes the runtime computes in FP32 for lack of a low-precision kernel

    @property
    def fused(self) -> list[Kernel]:
        return [k for k in self.kernels if k.fused]

    def absorbed(self, tensor: str) -> bool:
        return tensor not in self.boundaries

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "kernels": [k.to_dict() for k in self.kernels if k.fused],
                "boundaries": len(self.boundaries), "kernel_count": len(self.kernels)}


def map_deployed(original: ModelGraph, kernels: Iterable[tuple], runtime: str) -> DeployedGraph:
    """Map ``original`` onto deployed ``kernels``: (name, op_type, output tensor names) each, or
    (name, op_type, outputs, original node names) where the runtime lists them (TensorRT's layer
    information does): a listed original belongs to the first kernel listing it.

    Kernels whose outputs are not original tensors (layout transposes, reorders a runtime adds)
    keep no originals unless an absorbed node's first surviving downstream tensor is theirs.
    """
    kernels = [(k[0], k[1], list(k[2]), list(k[3]) if len(k) > 3 else []) for k in kernels]
    written_by = {t: name for name, _, outs, _ in kernels for t in outs}
    activations = set(original.activations()) | set(original.input_names)
    boundaries = frozenset(t for t in written_by if t in activations) | frozenset(original.input_names)
    listed: dict[str, str] = {}
    for name, _, _, originals in kernels:
        for node_name in originals:
            listed.setdefault(node_name, name)
    kernel_of: dict[str, str] = {}
    for node in original.nodes:
        if node.op_type == "Constant":
            continue
        owner = listed.get(node.name) or next((written_by[o] for o in node.output if o in boundaries and o in written_by), None)
        kernel_of[node.name] = owner if owner is not None else _downstream_owner(original, node, boundaries, written_by)
    members: dict[str, list[str]] = {}
    for node_name, kernel in kernel_of.items():
        if kernel is not None:
            members.setdefault(kernel, []).append(node_name)
    out = tuple(Kernel(name, op, tuple(members.get(name, ())), tuple(t for t in outs if t in boundaries)) for name, op, outs, _ in kernels)
    outputs = {n.name: tuple(o for o in n.output if o) for n in original.nodes}
    return DeployedGraph(runtime, out, boundaries, {k: v for k, v in kernel_of.items() if v is not None}, outputs)


def _downstream_owner(graph: ModelGraph, node: onnx.NodeProto, boundaries: frozenset[str], written_by: Mapping[str, str]) -> str | None:
    """The kernel writing the first surviving tensor downstream of ``node`` (topological order)."""
    seen, frontier, best = set(), list(node.output), None
    while frontier:
        tensor = frontier.pop()
        if tensor in seen or not tensor:
            continue
        seen.add(tensor)
        if tensor in boundaries and tensor in written_by:
            producer = graph.producer.get(tensor)
            index = graph.index_of[producer.name] if producer is not None else -1
            if best is None or index < best[0]:
                best = (index, written_by[tensor])
            continue
        for consumer in graph.consumers.get(tensor, ()):
            frontier.extend(o for o in consumer.output if o)
    return best[1] if best else None


# ONNX Runtime's CPU provider lacks most FP16 kernels: its InsertCastTransformer runs such nodes in
# FP32 and, where whole chains run in FP32, removes the casts between them, renaming the tensor.
ORT_FP32_PREFIX = "InsertedPrecisionFreeCast_"


def kernels_of_onnx(model: onnx.ModelProto) -> list[tuple[str, str, list[str]]]:
    """(name, op_type, outputs) of each node of an optimized ONNX model (ONNX Runtime writes it);
    a tensor ONNX Runtime renamed when it moved it to FP32 is mapped back to its original name."""
    out = []
    for i, node in enumerate(model.graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        out.append((node.name or f"{op}_{i}", op, [o.removeprefix(ORT_FP32_PREFIX) for o in node.output if o]))
    return out


# TensorRT's engine inspector (ProfilingVerbosity.DETAILED, LayerInformationFormat.JSON) writes
# {"Layers": [{"Name", "LayerType", "Inputs": [{"Name", ...}], "Outputs": [...], "Metadata", ...}],
#  "Bindings": [...]}; Metadata lists the ONNX nodes a layer computes, "[ONNX Layer: /a/Conv]",
# several separated by \x1e or \x1f (versions differ). Myelin regions ("{ForeignNode[/a...b]}")
# list every node they swallow; reformat layers list none. Without DETAILED verbosity the layers
# are bare name strings and nothing can be mapped.
# Some versions write a Myelin region's nodes as "[ONNX Layer: a][b][c]".
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ((?:[^\]\x1e\x1f]+\])(?:\[[^\]\x1e\x1f]+\])*)")


def _onnx_nodes(metadata: str) -> list[str]:
    names = []
    for group in _ONNX_LAYER.findall(metadata):
        names += [n for n in group.rstrip("]").split("][") if n]
    return list(dict.fromkeys(names))


def kernels_of_trt(info: Mapping | str) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, layer type, output tensors, ONNX nodes) of each layer of a TensorRT engine, from its
    inspector's JSON layer information (a dict or the JSON text)."""
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except json.JSONDecodeError as exc:
            raise InputError(f"TensorRT layer information is not JSON ({exc}); write it with "
                             "inspector.get_engine_information(LayerInformationFormat.JSON).") from None
    layers = info.get("Layers") if isinstance(info, Mapping) else None
    if not isinstance(layers, list):
        raise InputError("TensorRT layer information has no 'Layers' list; write it with "
                         "inspector.get_engine_information(LayerInformationFormat.JSON).")
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise InputError("TensorRT layer information lists layers by name only: the engine was built without detailed "
                             "profiling verbosity; rebuild it with config.profiling_verbosity = ProfilingVerbosity.DETAILED "
                             "(trtexec --profilingVerbosity=detailed).")
        name = str(layer.get("Name") or f"layer_{i}")
        outputs = [str(t["Name"]) for t in layer.get("Outputs", []) if isinstance(t, Mapping) and "Name" in t]
        originals = _onnx_nodes(str(layer.get("Metadata", "")))
        out.append((name, str(layer.get("LayerType", "")), outputs, originals))
    return out


def fp32_fallback(model: onnx.ModelProto) -> int:
    """How many nodes of an ONNX Runtime optimized graph compute in FP32 because the provider has
    no kernel of the model's low precision (their outputs carry ONNX Runtime's FP32 prefix)."""
    return sum(1 for n in model.graph.node if n.op_type != "Cast" and any(o.startswith(ORT_FP32_PREFIX) for o in n.output))


__all__ = ["DeployedGraph", "Kernel", "ORT_FP32_PREFIX", "fp32_fallback", "kernels_of_onnx", "kernels_of_trt", "map_deployed"]
