"""Which ONNX tensors are a PyTorch module's outputs.

Scopes: the legacy exporter names nodes by module scope (``/backbone/layer1/layer1.0/conv1/Conv``:
each part is the attribute path from the enclosing called module); the dynamo exporter records
``pkg.torch.onnx.name_scopes`` (full dotted module paths, then the FX node name). A module's
outputs are the tensors its scope produces and something outside it reads (or graph outputs).

Matching (``match``): first by value — a torch output and an ONNX tensor of the same shape whose
reference values agree within FP32 tolerance, preferring tensors in the module's scope; then, for
modules still unmatched, by structure — the only tensor of that shape leaving the module's scope,
not claimed by another module's value match. Structural matches are what exposes a module whose
export behaves differently from eager (its values disagree by design).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from aligner.graph.model import ModelGraph


def _legacy_path(name: str) -> str | None:
    parts = [p for p in name.split("/") if p][:-1]  # the last part is the op name
    if not parts:
        return None
    path: list[str] = []
    for part in parts:
        if path and part.startswith(path[-1] + "."):  # "layer1/layer1.0": a child named from the same parent
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def node_scopes(graph: ModelGraph) -> dict[str, str]:
    """Node name -> module path (only nodes whose scope is known)."""
    out = {}
    for node in graph.nodes:
        meta = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in meta:
            try:
                scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])  # untrusted: literals only
            except (ValueError, SyntaxError):
                continue
            if not isinstance(scopes, list):
                continue
            paths = [s for s in scopes[:-1] if isinstance(s, str)]
            if paths:
                out[node.name] = paths[-1]
        elif node.name.startswith("/"):
            path = _legacy_path(node.name)
            if path is not None:
                out[node.name] = path
    return out


def leaving_tensors(graph: ModelGraph, scopes: dict[str, str]) -> dict[str, list[str]]:
    """Module path -> tensors produced inside its scope (or a sub-scope) and read outside it."""
    members: dict[str, set[str]] = defaultdict(set)
    for node, path in scopes.items():
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            members[".".join(parts[:i])].add(node)
    outputs = set(graph.output_names)
    out: dict[str, list[str]] = {}
    for path, nodes in members.items():
        leaving = []
        for name in nodes:
            for t in graph.node(name).output:
                if t and (t in outputs or any(c.name not in nodes for c in graph.consumers.get(t, []))):
                    leaving.append(t)
        out[path] = sorted(set(leaving), key=lambda t: graph.index_of[graph.producer[t].name])
    return out


def agree(a: np.ndarray, b: np.ndarray, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = np.linalg.norm((a64 - b64).ravel())
    return bool(err <= rtol * max(np.linalg.norm(a64.ravel()), 1e-12) or np.max(np.abs(a64 - b64), initial=0) <= atol)


def match(calls, graph: ModelGraph, scopes: dict[str, str], values: Callable[[list[str]], dict[str, np.ndarray]]):
    """(matches {(path, call, key): (tensor, how)}, unmatched {(path, call): reason})."""
    leaving = leaving_tensors(graph, scopes)
    shapes: dict[tuple, list[str]] = defaultdict(list)
    activations = graph.activations()
    ref = values(activations)
    for t in activations:
        if t in ref:
            shapes[tuple(np.shape(ref[t]))].append(t)
    matches, claimed = {}, set()
    for c in calls:  # pass 1: by value, in-scope candidates first
        for key, out in zip(c.output_keys, c.outputs):
            scoped = [t for t in leaving.get(c.path, []) if t in ref and ref[t].shape == out.shape]
            hit = next((t for t in scoped if agree(out, ref[t])), None)
            if hit is None:  # outside its own scope (identity modules, inlined ones): the closest scope, then the smallest error
                near = [t for t in shapes.get(tuple(out.shape), []) if agree(out, ref[t])]
                hit = min(near, key=lambda t: (-_shared(scopes.get(graph.producer[t].name, ""), c.path), _error(out, ref[t])), default=None)
            if hit is not None:
                matches[(c.path, c.call, key)] = (hit, "value")
                claimed.add(hit)
    unmatched = {}
    for c in calls:  # pass 2: by structure
        for key, out in zip(c.output_keys, c.outputs):
            if (c.path, c.call, key) in matches:
                continue
            scoped = [t for t in leaving.get(c.path, []) if t in ref and ref[t].shape == out.shape and t not in claimed]
            if c.path in leaving and len(scoped) == 1 and c.call == 0:
                matches[(c.path, c.call, key)] = (scoped[0], "structure")
            else:
                unmatched[(c.path, c.call)] = _reason(c, leaving, scopes)
    return matches, unmatched


def _shared(a: str, b: str) -> int:
    """Number of leading module-path parts two paths share."""
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0)) if a.dtype.kind in "fc" else 0.0


def _reason(call, leaving, scopes) -> str:
    if call.path not in leaving:
        return "no ONNX node carries this module's scope (fused away, constant-folded, or inlined into its parent)"
    return "no ONNX tensor leaving its scope has its output's shape and values (fused into a neighbour, or changed)"


__all__ = ["agree", "leaving_tensors", "match", "node_scopes"]
