"""``compare_torch``: PyTorch module outputs vs the ONNX model on a target, module by module."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from aligner.backends import backend_of, make_runner, reference_runner
from aligner.backends.target import Target
from aligner.compare.discrete import DISCRETE_OPS, Margin, decision_margin
from aligner.compare.layerwise import diff_tensor
from aligner.compare.results import json_float
from aligner.compare.tolerance import Tolerance, tolerance_for
from aligner.compare.torch_map import match, node_scopes
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import validate_feeds


@dataclass(frozen=True)
class ModuleDiff:
    path: str
    call: int
    key: str  # which output of the call ("out", "[0]", "logits"...)
    type_name: str
    order: int
    tensor: str  # the matched ONNX tensor
    how: str  # "value" (reference values agree) or "structure" (scope and shape only)
    metrics: dict[str, float]
    diverges: bool

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["metrics"] = {k: json_float(v) for k, v in self.metrics.items()}
        return d


@dataclass(frozen=True)
class TorchRootCause:
    """Why the first divergent module diverges: ``discrete`` (a choice node in it picks between
    tied or nearly tied candidates, and the two sides picked differently: what follows inherits the
    flip) or ``local`` (its own computation or export differs)."""

    kind: Literal["discrete", "local"]
    module: str
    node: str  # the choice node (discrete) or the node producing the module's divergent tensor (local)
    op_type: str
    reason: str
    margin: Margin | None = None
    inheriting: tuple[str, ...] = ()  # divergent modules after it: they inherit the flip

    def to_dict(self) -> dict:
        return {"kind": self.kind, "module": self.module, "node": self.node, "op_type": self.op_type, "reason": self.reason,
                "margin": None if self.margin is None else {k: json_float(v) if isinstance(v, float) else v
                                                             for k, v in self.margin.to_dict().items()},
                "inheriting": list(self.inheriting)}


@dataclass(frozen=True)
class TorchCompareResult:
    reference: str
    target: str
    onnx: str
    modules: tuple[ModuleDiff, ...]
    unmatched: tuple[dict, ...]
    leaf_coverage: float  # share of leaf modules producing tensors that were matched
    tolerance: Tolerance
    notes: tuple[str, ...] = field(default_factory=tuple)
    root_cause: TorchRootCause | None = None  # why the first divergent module diverges

    @property
    def first_divergent(self) -> ModuleDiff | None:
        return next((m for m in sorted(self.modules, key=lambda m: m.order) if m.diverges), None)

    def verdict(self) -> str:
        first = self.first_divergent
        head = f"{len(self.modules)} module outputs matched (leaf coverage {self.leaf_coverage:.0%}), {len(self.unmatched)} unmatched"
        if first is None:
            return f"{head}; no module diverges beyond {self.tolerance.metric} {self.tolerance.threshold:g}."
        text = (f"{head}; the first module to diverge is {first.path!r} ({first.type_name}, call {first.call}) at ONNX tensor "
                f"{first.tensor!r}: " + (f"{self.tolerance.metric} {first.metrics[self.tolerance.metric]:.3g}."
                                         if self.tolerance.metric in first.metrics else "its values differ."))
        if self.root_cause is not None:
            text += f" Root cause ({self.root_cause.kind}): {self.root_cause.reason}."
        return text

    def to_dict(self) -> dict:
        first = self.first_divergent
        return {"reference": self.reference, "target": self.target, "onnx": self.onnx, "leaf_coverage": self.leaf_coverage,
                "modules": [m.to_dict() for m in self.modules], "unmatched": list(self.unmatched),
                "summary": {"first_divergent": None if first is None else {"module": first.path, "call": first.call, "tensor": first.tensor}},
                "root_cause": None if self.root_cause is None else self.root_cause.to_dict(), "notes": list(self.notes)}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"order": m.order, "module": m.path, "call": m.call, "output": m.key, "type": m.type_name,
                              "tensor": m.tensor, "match": m.how, **m.metrics, "diverges": m.diverges} for m in self.modules])


def export_onnx(model, args: Sequence, path: str | Path, exporter: str = "legacy", opset: int | None = None,
                dynamic: dict | None = None) -> list[str]:
    """Export with the legacy (TorchScript) or dynamo exporter; returns the warnings that mean
    trouble (values traced as constants: the export will not follow the input). ``dynamic`` is
    passed on as ``dynamic_axes`` (legacy: ``{"input": {0: "batch"}}``) or ``dynamic_shapes`` (dynamo)."""
    import torch

    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if exporter == "dynamo":
                torch.onnx.export(model, tuple(args), str(path), opset_version=opset or 18, dynamo=True, verbose=False,
                                  **({"dynamic_shapes": dynamic} if dynamic else {}))
            elif exporter == "legacy":
                torch.onnx.export(model, tuple(args), str(path), opset_version=opset or 17, dynamo=False,
                                  **({"dynamic_axes": dynamic} if dynamic else {}))
            else:
                raise InputError(f"Unknown exporter {exporter!r}: legacy or dynamo.")
        except InputError:
            raise
        except Exception as exc:  # the exporters raise many types
            raise InputError(f"The model failed to export with the {exporter} exporter: {str(exc).splitlines()[0][:300]}") from None
    return list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                              if any(k in str(w.message).lower() for k in ("constant", "trace might", "traced"))))


def compare_torch(model, args: Sequence, onnx: str | Path | None = None, target: str = "ort:cpu:fp32",
                  target_model: str | Path | None = None, exporter: str = "legacy", opset: int | None = None,
                  tolerance: Tolerance | None = None) -> TorchCompareResult:
    """Each PyTorch module call's outputs (eager, FP32, CPU) against the matching ONNX tensors on ``target``
    (or ``target_model``'s, e.g. an edited copy); the ONNX model is exported first if ``onnx`` is missing."""
    from aligner.backends.torch.runner import capture_module_outputs

    model = model.eval()
    target = Target.parse(target)
    if not backend_of(target).runs_onnx:
        return _torch_vs_torch(model, args, target, tolerance)
    notes, trouble = [], []
    if onnx is None:  # an export nobody asked to keep: in a temporary folder, removed once loaded
        with tempfile.TemporaryDirectory(prefix="aligner-torch-") as tmp:
            trouble = export_onnx(model, args, Path(tmp) / "model.onnx", exporter, opset)
            graph = ModelGraph.load(Path(tmp) / "model.onnx")
        onnx = "<temporary export, removed: pass onnx=PATH to keep it>"
        notes.append(f"exported with the {exporter} exporter to a temporary file (removed)")
    else:
        if not Path(onnx).exists():
            trouble = export_onnx(model, args, onnx, exporter, opset)
            notes.append(f"exported with the {exporter} exporter to {onnx}")
        graph = ModelGraph.load(onnx)
    notes += [f"export warning: {w}" for w in trouble]
    arrays = [np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for a in args]
    if len(arrays) != len(graph.input_names):
        raise InputError(f"The ONNX model takes {len(graph.input_names)} input(s) {graph.input_names}; {len(arrays)} given.")
    feeds = validate_feeds(graph, dict(zip(graph.input_names, arrays)))  # shapes: expected vs given
    calls = capture_module_outputs(model, args)
    ref = reference_runner(graph)
    matches, unmatched = match(calls, graph, node_scopes(graph), lambda names: _capture(ref, feeds, names))
    other = ModelGraph.load(target_model) if target_model is not None else graph
    runner = make_runner(other, target)
    wanted = sorted({t for t, _ in matches.values() if t in runner.capturable})
    got = _capture(runner, feeds, wanted)
    tol = tolerance or tolerance_for(target)
    by_key = {(c.path, c.call, k): (c, o) for c in calls for k, o in zip(c.output_keys, c.outputs)}
    diffs = []
    for key, (tensor, how) in matches.items():
        if tensor not in got:
            continue
        call, out = by_key[key]
        d = diff_tensor(out, got[tensor], tol)
        metrics, diverges = d.metrics, d.diverges
        diffs.append(ModuleDiff(call.path, call.call, key[2], call.type_name, call.order, tensor, how, metrics, diverges))
    producing = {(c.path, c.call) for c in calls if c.leaf and c.outputs}
    matched = {(m.path, m.call) for m in diffs}
    coverage = len(producing & matched) / len(producing) if producing else 1.0
    lost = tuple({"module": p, "call": k, "reason": r} for (p, k), r in unmatched.items() if (p, k) not in matched)
    diffs = sorted(diffs, key=lambda m: m.order)
    cause = torch_root_cause(graph, diffs, node_scopes(graph), lambda names: _capture(runner, feeds, names))
    return TorchCompareResult(TORCH_REFERENCE, str(target) if target_model is None else f"{target} ({Path(target_model).name})",
                              str(onnx), tuple(diffs), lost, coverage, tol, tuple(notes), cause)


def torch_root_cause(graph: ModelGraph, diffs: Sequence[ModuleDiff], scopes: dict[str, str],
                     values: Callable[[list[str]], dict[str, np.ndarray]]) -> TorchRootCause | None:
    """Classify the first divergent module (``diffs`` in call order; ``values`` captures ONNX tensors
    on the target). The choice nodes (TopK, NonMaxSuppression, ArgMax, comparisons...) that feed its
    divergent tensor from inside its scope are examined on the target's own values: one whose
    closest call (:func:`~aligner.compare.discrete.decision_margin`) is within the error the two
    sides already show before it (or an exact tie) is where the outputs part — ``discrete``, and the
    modules after it inherit the flip. Otherwise the module's own computation is to blame (``local``)."""
    first = next((m for m in diffs if m.diverges), None)
    if first is None or first.tensor not in graph.producer:
        return None
    before = [m.metrics.get("rel_l2", 0.0) for m in diffs if m.order < first.order and not m.diverges]
    noise = max([v for v in before if np.isfinite(v)], default=0.0)
    allowed = max(10 * noise, TIE_RELATIVE)
    later = tuple(dict.fromkeys(m.path for m in diffs if m.diverges and m.order > first.order and m.path != first.path))
    choices = _choices_feeding(graph, first.tensor, first.path, scopes)
    wanted = sorted({t for n in choices for t in n.input if t and t not in graph.initializers})
    got = values(wanted) if wanted else {}
    for node in choices:
        margin = decision_margin(node.op_type, [_value(graph, got, t) for t in node.input], _attrs(node))
        if margin is not None and margin.relative <= allowed:
            tie = "tied" if margin.gap == 0 else f"{margin.gap:.3g} apart (relative {margin.relative:.2g})"
            reason = (f"{node.op_type} {node.name!r} in module {first.path!r} chooses between candidates {tie} ({margin.what}); "
                      f"PyTorch and ONNX Runtime already differ by rel_l2 up to {noise:.2g} in the modules before it, so the two "
                      f"sides may pick differently and both be right. What follows inherits the flip"
                      + (f" ({', '.join(repr(p) for p in later[:5])}{', ...' if len(later) > 5 else ''}): do not blame their "
                         "arithmetic" if later else "")
                      + ". Compare after matching or sorting the detections, or make the tie-break agree")
            return TorchRootCause("discrete", first.path, node.name, node.op_type, reason, margin, later)
    producer = graph.producer[first.tensor]
    checked = (f"; its choice nodes ({', '.join(n.name for n in choices[:4])}) are not near a tie (allowed relative margin "
               f"{allowed:.2g})") if choices else ""
    reason = (f"module {first.path!r} is the first to diverge while every module before it matches (rel_l2 up to {noise:.2g}): "
              f"its own computation or export differs, at or before node {producer.name!r} ({producer.op_type}){checked}")
    return TorchRootCause("local", first.path, producer.name, producer.op_type, reason, None, later)


TIE_RELATIVE = 1e-6  # relative gaps at or below this count as ties whatever the upstream error


def _choices_feeding(graph: ModelGraph, tensor: str, path: str, scopes: dict[str, str]) -> list:
    """Choice nodes inside module ``path``'s scope that ``tensor`` depends on, in topological order."""
    inside = lambda name: not path or scopes.get(name, "") == path or scopes.get(name, "").startswith(path + ".")  # noqa: E731
    seen, stack, found = set(), [tensor], []
    while stack:
        t = stack.pop()
        node = graph.producer.get(t)
        if node is None or node.name in seen or not inside(node.name):
            continue
        seen.add(node.name)
        if node.op_type in DISCRETE_OPS:
            found.append(node)
        stack += [x for x in node.input if x]
    return sorted(found, key=lambda n: graph.index_of[n.name])


def _value(graph: ModelGraph, got: dict, name: str):
    if not name:
        return None
    if name in got:
        return got[name]
    from onnx import numpy_helper

    if name in graph.initializers:
        return numpy_helper.to_array(graph.initializers[name])
    src = graph.producer.get(name)
    if src is not None and src.op_type == "Constant":
        value = next((a.t for a in src.attribute if a.name == "value"), None)
        return numpy_helper.to_array(value) if value is not None else None
    return None


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.type in (1, 2, 3)}  # float, int, string


TORCH_REFERENCE = "torch:cpu:fp32"


def _torch_vs_torch(model, args: Sequence, target: Target, tolerance: Tolerance | None) -> TorchCompareResult:
    """Every module call on ``target`` (e.g. torch:cuda:fp16) against eager FP32 on the CPU."""
    import copy

    from aligner.backends.torch.runner import capture_module_outputs

    device, precision = target.device, target.precision
    reference = capture_module_outputs(copy.deepcopy(model), args)
    autocast = precision == "autocast"
    got = capture_module_outputs(copy.deepcopy(model), args, device=device, dtype="fp16" if autocast else precision, autocast=autocast)
    tol = tolerance or tolerance_for(target)
    theirs = {(c.path, c.call, k): o for c in got for k, o in zip(c.output_keys, c.outputs)}
    diffs = []
    for c in reference:
        for key, out in zip(c.output_keys, c.outputs):
            other = theirs.get((c.path, c.call, key))
            if other is None:
                continue
            d = diff_tensor(out, other, tol)
            metrics, diverges = d.metrics, d.diverges
            diffs.append(ModuleDiff(c.path, c.call, key, c.type_name, c.order, "", "module", metrics, diverges))
    return TorchCompareResult(TORCH_REFERENCE, str(target), "", tuple(diffs), (), 1.0, tol)


def _capture(runner, feeds: dict, names: list[str], group: int = 200) -> dict[str, np.ndarray]:
    out = {}
    names = [n for n in names if n in runner.capturable]
    for i in range(0, len(names), group):
        out.update(runner.run(feeds, names[i:i + group]))
    return out


__all__ = ["ModuleDiff", "TORCH_REFERENCE", "TorchCompareResult", "TorchRootCause", "compare_torch", "export_onnx", "torch_root_cause"]
