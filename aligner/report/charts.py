"""Charts as inline SVG, drawn by matplotlib (imported here only, never by ``import aligner``).

Why matplotlib SVG rather than a JavaScript chart library: the page must open offline from a mail
attachment with no external scripts, SVG is vector and self-contained, and matplotlib is already
in this field's toolbox. Text is drawn as glyph paths (``svg.fonttype = "path"``) and every
string from the model has its ``$`` escaped, so a hostile node name can become neither markup nor
mathtext.
"""

from __future__ import annotations

import io
import math

from aligner._optional import require
from aligner.compare.metrics import HIGHER_IS_BETTER

EMULATED = "#b0b7c3"
BLAME_COLOURS = {"kernel": "#d62728", "quantization": "#ff7f0e", "": "#4a7ab8"}  # kernel_or_quantization's verdicts


def _pyplot():
    require("matplotlib", "drawing the report's charts")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _plain(text: str) -> str:
    """A model's string shown literally (no mathtext)."""
    return text.replace("$", r"\$")


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG goes inline


def layer_error_chart(rows: list[dict], metric: str, threshold: float, culprit_index: int | None = None,
                      culprit_label: str = "", title: str = "") -> str:
    """``metric`` per tensor vs topological index (log scale), tolerance line, first divergence and
    root cause marked, the region where the target has NaN/inf shaded; tensors a fused kernel of the
    deployed graph writes ticked along the bottom, tensors whose capture perturbed the target crossed."""
    plt = _pyplot()
    rows = [r for r in rows if str(r.get("dtype", "float")).startswith(("float", "bfloat"))]  # shapes and indices are exact
    fig, ax = plt.subplots(figsize=(8.0, 3.2))
    pts = [(r["index"], r["metrics"].get(metric)) for r in rows if isinstance(r["metrics"].get(metric), (int, float))]
    finite = [(i, v) for i, v in pts if math.isfinite(v)]
    floor = min([v for _, v in finite if v > 0], default=1e-12) / 10
    xs = [i for i, _ in finite]
    ys = [max(v, floor) for _, v in finite]
    div = [(r["index"], max(r["metrics"].get(metric, floor) if math.isfinite(r["metrics"].get(metric, math.nan)) else floor, floor))
           for r in rows if r.get("diverges") and isinstance(r["metrics"].get(metric), (int, float))]
    ax.plot(xs, ys, ".", ms=3, color="#4a7ab8", label=f"{metric} per tensor")
    fused = [r["index"] for r in rows if r.get("kernel")]
    if fused:  # tensors written by a fused kernel: the deployed graph's boundaries
        ax.plot(fused, [floor] * len(fused), "|", ms=6, color="#2ca02c", label="fused-kernel boundary")
    moved = [(r["index"], max(r["metrics"].get(metric, floor), floor)) for r in rows if r.get("perturbed")
             and isinstance(r["metrics"].get(metric), (int, float)) and math.isfinite(r["metrics"][metric])]
    if moved:
        ax.plot([m[0] for m in moved], [m[1] for m in moved], "x", ms=4, color="#7f7f7f", label="capture perturbed (not blamed)")
    if div:
        ax.plot([d[0] for d in div], [d[1] for d in div], "o", ms=4, mfc="none", color="#c0392b", label="diverges")
    ax.axhline(threshold, color="#888", lw=0.8, ls="--", label=f"tolerance {threshold:g}")
    bad = [r["index"] for r in rows if r.get("nonfinite", {}).get("target", {}).get("nan", 0) + _inf(r) > 0]
    if bad:
        ax.axvspan(min(bad), max(bad), color="#f5b7b1", alpha=0.35, lw=0, label="target has NaN/inf")
    first = next((r["index"] for r in rows if r.get("diverges")), None)
    if first is not None:
        ax.axvline(first, color="#c0392b", lw=1, label=f"first divergence (#{first})")
    if culprit_index is not None:
        ax.axvline(culprit_index, color="#8e44ad", lw=1.5, ls=":", label=_plain(f"root cause (#{culprit_index}) {culprit_label}"[:70]))
    ax.set_yscale("log")
    ax.set_xlabel("topological index of the producing node")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(_plain(title[:100]), loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _inf(row: dict) -> int:
    t = row.get("nonfinite", {}).get("target", {})
    return int(t.get("posinf", 0)) + int(t.get("neginf", 0))


def trials_chart(trials: list[dict]) -> str:
    """Pins per trial, pass or fail: how the search narrowed down."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 2.6))
    for i, t in enumerate(trials, 1):
        color = "#27ae60" if t.get("passed") else ("#7f8c8d" if t.get("error") else "#c0392b")
        ax.bar(i, len(t.get("pins", [])), color=color, width=0.8)
    ax.set_xlabel("trial (green: passes, red: fails, grey: target error)")
    ax.set_ylabel("nodes pinned to FP32")
    svg = _svg(fig)
    plt.close(fig)
    return svg


def quantization_error_chart(rows: list[dict], metric: str, threshold: float, title: str = "") -> str:
    """INT8: each node's own (isolated) error on the real integer kernels beside the same node with
    Q/DQ evaluated in float, one pair of bars per node, worst first (``rows`` as the report ranks
    them: node, op_type, real, emulated, blame). Nodes the kernel is blamed for (emulated within
    the tolerance, real beyond it) are red, bar and label; those quantization is blamed for, orange."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    log = metric not in HIGHER_IS_BETTER
    finite = [v for r in rows for v in (r["real"], r["emulated"]) if v is not None and math.isfinite(v) and (v > 0 or not log)]
    finite += [threshold] if threshold > 0 or not log else []  # the tolerance line stays on the chart
    floor = min(finite, default=1e-6) / 10 if log else min(finite + [0.0])
    ceiling = max(finite, default=1.0) * (10 if log else 1.1)
    fig, ax = plt.subplots(figsize=(8.0, 1.0 + 0.3 * len(rows)))
    ys = range(len(rows))[::-1]  # the worst at the top
    for y, r in zip(ys, rows):
        for value, offset, colour in ((r["real"], 0.2, BLAME_COLOURS[r["blame"]]), (r["emulated"], -0.2, EMULATED)):
            if value is None:
                continue
            shown = value if math.isfinite(value) else ceiling
            ax.barh(y + offset, max(shown, floor) - floor, left=floor, height=0.38, color=colour, hatch="" if math.isfinite(value) else "//")
    ax.set_yticks(list(ys), [_plain(f"{r['node']} ({r['op_type']})"[:48]) for r in rows], fontsize=7)
    for label, r in zip(ax.get_yticklabels(), rows):
        if r["blame"] == "kernel":
            label.set_color(BLAME_COLOURS["kernel"])
    if log:
        ax.set_xscale("log")
    ax.set_xlim(floor, ceiling)
    ax.axvline(threshold, color="#888", lw=0.8, ls="--")
    handles = [Patch(color=BLAME_COLOURS[""], label="real integer kernel: within tolerance"),
               Patch(color=BLAME_COLOURS["kernel"], label="real: the kernel's error (emulated within tolerance)"),
               Patch(color=BLAME_COLOURS["quantization"], label="real: quantization's error (emulated beyond too)"),
               Patch(color=EMULATED, label="Q/DQ in float (emulated)"),
               Line2D([], [], color="#888", lw=0.8, ls="--", label=f"tolerance {threshold:g}")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_xlabel(f"own {metric} of the node (isolated; hatched: NaN/inf)")
    if title:
        ax.set_title(_plain(title[:100]), loc="left")
    svg = _svg(fig)
    plt.close(fig)
    return svg


def latency_throughput_chart(rows: list[dict]) -> str:
    """Median latency vs throughput, one line per target, points labelled by batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 3.4))
    for target in dict.fromkeys(r["target"] for r in rows):
        pts = sorted(((r["throughput"], r["latency_ms"]["median"], r["batch"]) for r in rows if r["target"] == target), key=lambda p: p[2])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=_plain(target))
        for x, y, b in pts:
            ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("throughput (items/s)")
    ax.set_ylabel("median latency (ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    svg = _svg(fig)
    plt.close(fig)
    return svg


__all__ = ["latency_throughput_chart", "layer_error_chart", "quantization_error_chart", "trials_chart"]
