"""What each overlay shows: per-node values and colours from run results (JSON dicts, as runs store them).

The quantities and their colour scales: categories get fixed colours; errors are coloured by
log10(error / tolerance) (:func:`badness`, :func:`error_colour`), from pale green far below the
tolerance through yellow at it to dark red 10^4 times above, with NaN/inf apart in purple. Values
are numbers or short texts; Model Explorer shows them in its side panel and node-data table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import onnx

from aligner.compare.metrics import HIGHER_IS_BETTER
from aligner.graph.model import node_keys, topological_order
from aligner.report.runs import Run

FIRST, DOWNSTREAM, OTHER, WITHIN = "#d62728", "#ff7f0e", "#9467bd", "#c7e9c0"
NONFINITE, NONFINITE_INHERITED = "#7b3294", "#d8b5e0"
PIN, AUTO_PIN = "#1f77b4", "#17becf"
KERNELS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
# Error colour by log10(error / tolerance): pale green far below, yellow at the tolerance, dark red 10^4 above.
ERROR_SCALE = ((-3.0, "#f7fcf5"), (-1.0, "#c7e9c0"), (0.0, "#fee08b"), (1.0, "#fdae61"), (2.0, "#f46d43"),
               (3.0, "#d73027"), (4.0, "#a50026"))
ERROR_LEGEND = (("1/1000 of the tolerance or less", "#f7fcf5"), ("at the tolerance", "#fee08b"), ("10x the tolerance", "#fdae61"),
                ("100x", "#f46d43"), ("1000x", "#d73027"), ("10^4x or more", "#a50026"), ("NaN/inf on the target", NONFINITE))


@dataclass(frozen=True)
class Overlay:
    """One node-data file: a value and a colour per node (aligner's node names)."""

    name: str  # file stem, the name the viewer lists it under
    title: str
    description: str
    legend: tuple[tuple[str, str], ...]  # (meaning, colour)
    values: dict[str, tuple[float | str, str]]  # node -> (value, colour)

    def node_data(self, ids: dict[str, str]) -> dict:
        """Model Explorer's GraphNodeData, keyed by the viewer's node ids."""
        return {"results": {ids[n]: {"value": v, "bgColor": c} for n, (v, c) in self.values.items() if n in ids}}


def overlays_of(runs: list[Run], proto: onnx.ModelProto) -> list[Overlay]:
    """Every overlay the runs hold evidence for (see aligner.report.graph_overlay for the list)."""
    targets = sorted({r.result.get("target", "") for r in runs if r.kind in ("compare", "bisect")})
    plans = [r for r in runs if r.kind == "precision"]
    out: list[Overlay] = []
    for target in targets:
        group = [r for r in runs if r.kind in ("compare", "bisect") and r.result.get("target", "") == target]
        suffix = f".{_slug(target)}" if len(targets) > 1 else ""
        out += _divergence_overlays(group, proto, suffix)
    for i, plan in enumerate(plans):
        pins = _pins(plan)
        if pins.values:
            out.append(pins if len(plans) == 1 else _renamed(pins, f"{pins.name}.{_slug(plan.result.get('target', ''))}-{i + 1}"))
    kernels = _fused_kernels(runs)
    if kernels.values:
        out.append(kernels)
    return out


def _divergence_overlays(runs: list[Run], proto: onnx.ModelProto, suffix: str) -> list[Overlay]:
    compares = [r.result for r in runs if r.kind == "compare"]
    bisects = [r.result for r in runs if r.kind == "bisect"]
    tensors = compares[0]["tensors"] if compares else []
    tolerance = (compares or bisects)[0]["tolerance"]
    found = [
        _first_divergence(tensors, bisects, compares, proto),
        _error_overlay("accumulated-error", "Accumulated error per node",
                       "each node's worst output error against the reference, with the error of everything upstream (compare)",
                       _worst_per_node(tensors, tolerance), tolerance),
        _error_overlay("local-error", "Local (isolated) error per node",
                       "each node run alone on the reference's inputs: its own error, without what it inherits (bisect)",
                       {e["node"]: (e["metrics"], bool(e.get("new_nonfinite"))) for b in bisects for e in b.get("local_errors", [])},
                       tolerance),
        _nonfinite(tensors, bisects, compares),
    ]
    return [_renamed(o, o.name + suffix) for o in found if o.values]


def _first_divergence(tensors: list[dict], bisects: list[dict], compares: list[dict], proto: onnx.ModelProto) -> Overlay:
    cause = next((b["root_cause"] for b in bisects if b.get("root_cause")), None)
    first = cause or next((b["first_divergent"] for b in bisects if b.get("first_divergent")), None) \
        or next((c["summary"]["first_divergent"] for c in compares if c["summary"].get("first_divergent")), None)
    values: dict[str, tuple[float | str, str]] = {}
    downstream = _downstream(proto, first["node"]) if first else set()
    for t in tensors:
        if t["node"] in values and not t.get("diverges"):
            continue
        if not t.get("diverges"):
            values[t["node"]] = ("within tolerance", WITHIN)
        else:
            values[t["node"]] = ("diverges downstream of the first", DOWNSTREAM) if t["node"] in downstream else ("diverges (another source)", OTHER)
    if first:
        reason = (cause or {}).get("reason", "")
        values[first["node"]] = (f"first divergence: {reason}" if reason else "first divergence", FIRST)
    legend = (("first divergence", FIRST), ("diverges downstream of it", DOWNSTREAM),
              ("diverges, not downstream (another source)", OTHER), ("within tolerance", WITHIN))
    return Overlay("first-divergence", "Where the divergence starts and where it goes",
                   "the first divergent node (bisect's root cause), the divergent nodes downstream of it, others, and the compared "
                   "nodes within tolerance", legend, values)


def _downstream(proto: onnx.ModelProto, start: str) -> set[str]:
    """Nodes (aligner names) reachable from ``start`` through tensors."""
    ordered = topological_order(proto.graph)
    names = node_keys(ordered)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(ordered):
        for t in node.input:
            consumers.setdefault(t, []).append(i)
    if start not in names:
        return set()
    seen, stack = set(), [names.index(start)]
    while stack:
        i = stack.pop()
        for out in ordered[i].output:
            for j in consumers.get(out, []):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
    return {names[i] for i in seen}


def _worst_per_node(tensors: list[dict], tolerance: dict) -> dict[str, tuple[dict, bool]]:
    """Per node: the metrics of its worst output, and whether the target made new NaN/inf in any output."""
    metric, threshold = tolerance["metric"], float(tolerance["threshold"])
    out: dict[str, tuple[dict, bool]] = {}
    rank: dict[str, float] = {}
    for t in tensors:
        node, value = t["node"], _float(t["metrics"].get(metric))
        new_nf = _nf(t["nonfinite"]["target"]) > _nf(t["nonfinite"]["reference"])
        score = math.inf if value is None or math.isnan(value) else badness(metric, value, threshold)
        if node not in out or score > rank[node]:
            out[node], rank[node] = (t["metrics"], new_nf or (node in out and out[node][1])), score
        elif new_nf:
            out[node] = (out[node][0], True)
    return out


def _error_overlay(name: str, title: str, description: str, per_node: dict[str, tuple[dict, bool]], tolerance: dict) -> Overlay:
    metric, threshold = tolerance["metric"], float(tolerance["threshold"])
    values: dict[str, tuple[float | str, str]] = {}
    for node, (metrics, nonfinite) in per_node.items():
        value = _float(metrics.get(metric))
        if nonfinite or value is None or math.isnan(value):
            values[node] = ("NaN/inf", NONFINITE)
        else:  # an infinite metric is a value too (snr_db of identical tensors); JSON has no inf, so it is shown as text
            values[node] = (value if math.isfinite(value) else str(value), error_colour(badness(metric, value, threshold)))
    rule = f"{metric} {'>=' if metric in HIGHER_IS_BETTER else '<='} {threshold:g}"
    return Overlay(name, f"{title} ({metric}, log scale)", f"{description}; colour: log10 of the error over the tolerance ({rule})",
                   ERROR_LEGEND, values)


def _nonfinite(tensors: list[dict], bisects: list[dict], compares: list[dict]) -> Overlay:
    origin = next((b["nonfinite_origin"] for b in bisects if b.get("nonfinite_origin")), None) \
        or next((c["summary"]["first_nonfinite"] for c in compares if c["summary"].get("first_nonfinite")), None)
    values: dict[str, tuple[float | str, str]] = {
        t["node"]: ("NaN/inf, carried from upstream", NONFINITE_INHERITED)
        for t in tensors if _nf(t["nonfinite"]["target"]) > _nf(t["nonfinite"]["reference"])}
    if origin:
        reason = origin.get("reason", "")
        values[origin["node"]] = (f"NaN/inf origin: {reason}" if reason else "NaN/inf origin", NONFINITE)
    return Overlay("nan-inf", "Where NaN/inf first appear on the target",
                   "the first node whose output has NaN/inf where the reference has none (bisect's provenance), and the nodes after it "
                   "that carry them", (("NaN/inf origin", NONFINITE), ("NaN/inf carried from upstream", NONFINITE_INHERITED)), values)


def _pins(run: Run) -> Overlay:
    r = run.result
    low = str(r.get("precision", "low precision")).upper()
    values: dict[str, tuple[float | str, str]] = {p["node"]: (p.get("reason") or "kept in FP32", PIN) for p in r.get("fp32_nodes", [])}
    for node, reason in (r.get("auto_pinned") or {}).items():
        values.setdefault(node, (f"no {low} form: {reason}", AUTO_PIN))
    return Overlay("fp32-pins", f"Nodes the plan keeps in FP32 ({r.get('target', '')})",
                   f"the precision plan's FP32 nodes with the reason for each (value); the rest runs in {low}",
                   (("kept in FP32 by the plan", PIN), (f"FP32 because the op has no {low} form", AUTO_PIN)), values)


def _fused_kernels(runs: list[Run]) -> Overlay:
    values: dict[str, tuple[float | str, str]] = {}
    legend = []
    for run in runs:
        kernels = run.result.get("fused_kernels") or []
        if isinstance(kernels, dict):
            kernels = [{"kernel": k, "nodes": v} for k, v in kernels.items()]
        for k in kernels:
            colour = KERNELS[len(legend) % len(KERNELS)]
            name = str(k.get("name", k.get("kernel", "?")))  # compare writes Kernel.to_dict(): name, op_type, originals
            legend.append((name, colour))
            for node in k.get("originals", k.get("nodes", [])):
                values.setdefault(node, (name, colour))
    return Overlay("fused-kernels", "Fused kernels: which original nodes each one computes",
                   "the runtime's fused kernel each ONNX node belongs to (value: the kernel)", tuple(legend[:20]), values)


def badness(metric: str, value: float, threshold: float) -> float:
    """log10 of how far an error is beyond (>0) or within (<0) the tolerance, for every metric."""
    if metric == "snr_db":  # SNR is 20*log10 of the amplitude ratio
        return (threshold - value) / 20.0
    if metric == "cosine":
        value, threshold = 1.0 - value, 1.0 - threshold
    return math.log10(max(value, 1e-30) / max(threshold, 1e-30))


def error_colour(b: float) -> str:
    """Interpolated colour of ERROR_SCALE at ``b`` (clipped to its ends)."""
    stops = ERROR_SCALE
    b = min(max(b, stops[0][0]), stops[-1][0])
    for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
        if b <= x1:
            f = (b - x0) / (x1 - x0)
            rgb = [round(int(c0[i:i + 2], 16) + f * (int(c1[i:i + 2], 16) - int(c0[i:i + 2], 16))) for i in (1, 3, 5)]
            return "#" + "".join(f"{v:02x}" for v in rgb)
    return stops[-1][1]


def _float(value) -> float | None:
    """A metric as run JSON stores it (a number, or "inf"/"-inf"/"nan") as a float."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _nf(counts: dict) -> int:
    return int(counts.get("nan", 0)) + int(counts.get("posinf", 0)) + int(counts.get("neginf", 0))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "target"


def _renamed(overlay: Overlay, name: str) -> Overlay:
    return Overlay(name, overlay.title, overlay.description, overlay.legend, overlay.values)


__all__ = ["ERROR_LEGEND", "FIRST", "NONFINITE", "Overlay", "PIN", "badness", "error_colour", "overlays_of"]
