"""Which id Model Explorer gives each node of an ONNX file, so overlays land on the right node.

Model Explorer's ONNX adapter (``model-explorer-onnx`` 0.4.2, the version the ``view`` extra pins)
loads the file with ``onnx.load(..., load_external_data=False)`` and runs onnx_ir's
``NameFixPass`` before anything else; the id of a node in the viewer is the name that pass leaves:

* a node whose name is non-empty and not taken yet keeps it;
* an unnamed node is called ``node``, a repeated name ``name``; if that is taken, ``_1``, ``_2``, ...
  are tried, with one counter per base name shared by the whole model (subgraph bodies included:
  the pass walks each node, then its bodies, in file order; each body has its own set of taken names).

aligner names nodes its own way (``aligner.graph.model.node_keys``: the name when it is unique,
else ``OpType(first output)``, over the nodes in topological order). :func:`viewer_node_ids`
maps one to the other, so an unnamed or duplicated node's overlay value lands on the node the
viewer draws. Node data keyed by output tensor names does not work for ONNX: the viewer matches
those through a ``tensor_name`` output attribute that this adapter does not set.
"""

from __future__ import annotations

from collections import Counter

import onnx

from aligner.graph.model import node_keys, topological_order

MAIN_GRAPH_FALLBACK = "<main>"  # the adapter's id for a main graph without a name


def viewer_node_ids(model: onnx.ModelProto) -> dict[str, str]:
    """aligner's identity of every main-graph node -> the node's id in Model Explorer."""
    file_nodes = list(model.graph.node)
    viewer_ids = adapter_node_ids(model.graph)
    slots: dict[tuple, list[int]] = {}
    for i, node in enumerate(file_nodes):
        slots.setdefault(_signature(node), []).append(i)
    ordered = topological_order(model.graph)
    out = {}
    for node, key in zip(ordered, node_keys(ordered)):
        out[key] = viewer_ids[slots[_signature(node)].pop(0)]
    return out


def adapter_node_ids(graph: onnx.GraphProto) -> list[str]:
    """The viewer's id of each node of ``graph.node``, in file order (onnx_ir's NameFixPass)."""
    counter: Counter = Counter()

    def fix(node: onnx.NodeProto, taken: set[str]) -> str:
        if node.name and node.name not in taken:
            taken.add(node.name)
            return node.name
        base = name = node.name or "node"
        while name in taken:
            counter[base] += 1
            name = f"{base}_{counter[base]}"
        taken.add(name)
        return name

    def bodies(node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                taken: set[str] = set()
                for inner in body.node:
                    fix(inner, taken)
                    bodies(inner)

    taken: set[str] = set()
    ids = []
    for node in graph.node:
        ids.append(fix(node, taken))
        bodies(node)
    return ids


def graph_id(model: onnx.ModelProto) -> str:
    """The viewer's id of the main graph (what a deep link's ``selectedGraphId`` names)."""
    return model.graph.name if model.graph.HasField("name") else MAIN_GRAPH_FALLBACK


def _signature(node: onnx.NodeProto) -> tuple:
    return node.name, node.domain, node.op_type, tuple(node.input), tuple(node.output)


__all__ = ["adapter_node_ids", "graph_id", "viewer_node_ids"]
