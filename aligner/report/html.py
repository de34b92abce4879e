"""One self-contained HTML page from one or more run directories.

Every string from a model (node, tensor and op names, reasons quoting them) goes through Jinja2's
autoescaping, Model Explorer links included (their node names are percent-encoded JSON inside an
escaped attribute); the only unescaped content is the SVG matplotlib draws, whose text is glyph paths.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from aligner._optional import require
from aligner.compare.metrics import HIGHER_IS_BETTER
from aligner.compare.tolerance import Tolerance
from aligner.errors import InputError
from aligner.inputs import write_atomic
from aligner.report.charts import latency_throughput_chart, layer_error_chart, quantization_error_chart, trials_chart
from aligner.report.graph_overlay import VIEWER_PORT, GraphOverlays
from aligner.report.runs import Run, read_run
from aligner.search.isolate import kernel_or_quantization
from aligner.search.verdict import LocalError


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _nf(counts: dict) -> int:
    return int(counts.get("nan", 0)) + int(counts.get("posinf", 0)) + int(counts.get("neginf", 0))


def _yn(flag) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _view(run: Run, runs: list[Run]) -> dict:
    """What the template needs for one run: the result plus its chart and trimmed tables."""
    view = {"kind": run.kind, "result": run.result, "meta": run.meta, "path": str(run.path), "trials": list(run.trials), "chart": ""}
    if run.kind == "compare":
        r = run.result
        cause = next((x.result.get("root_cause") for x in runs if x.kind == "bisect" and x.meta.get("model") == run.meta.get("model")
                      and x.result.get("root_cause")), None)
        view["chart"] = layer_error_chart(
            r["tensors"], r["tolerance"]["metric"], r["tolerance"]["threshold"],
            culprit_index=cause["index"] if cause else None, culprit_label=cause["node"] if cause else "",
            title=f"{r['target']} vs {r['reference']}")
        view["top"] = [t for t in r["tensors"] if t.get("diverges")][:20]
        view["kernels"] = _kernel_rows(r)
    elif run.kind == "bisect" and (rows := quantization_rows(run.result)):
        view["int8"] = rows
        tol = run.result["tolerance"]
        view["chart"] = quantization_error_chart(rows, tol["metric"], tol["threshold"], title=f"{run.result['target']}: own error per node")
    elif run.kind == "precision" and run.trials:
        view["chart"] = trials_chart(list(run.trials))
    elif run.kind == "bench" and run.result.get("rows"):
        view["chart"] = latency_throughput_chart(run.result["rows"])
    return view


def _kernel_rows(result: dict, limit: int = 50) -> list[dict]:
    """Per fused kernel of the deployed graph: its original nodes, the tensors compared at its
    boundary, the worst of them and whether a capture perturbed it; worst first."""
    metric = result["tolerance"]["metric"]
    higher = metric in HIGHER_IS_BETTER
    by_kernel: dict[str, list[dict]] = {}
    for t in result.get("tensors", []):
        if t.get("kernel"):
            by_kernel.setdefault(t["kernel"], []).append(t)
    rows = []
    for k in result.get("fused_kernels") or []:
        if not isinstance(k, dict) or len(k.get("originals", ())) < 2:
            continue
        compared = by_kernel.get(k.get("name"), [])
        values = [t["metrics"][metric] for t in compared if isinstance(t.get("metrics", {}).get(metric), (int, float))]
        worst = (min(values) if higher else max(values)) if values else None
        rows.append({"name": k.get("name", "?"), "op_type": k.get("op_type", ""), "originals": list(k.get("originals", [])),
                     "precision": str(k.get("precision", "")),  # what the runtime ran it in, where it says (OpenVINO)
                     "compared": [t["tensor"] for t in compared], "worst": worst,
                     "diverges": any(t.get("diverges") for t in compared), "perturbed": next((t["perturbed"] for t in compared if t.get("perturbed")), "")})
    return sorted(rows, key=lambda row: _worse_first(row["worst"], metric))[:limit]


def quantization_rows(result: dict, limit: int = 30) -> list[dict]:
    """INT8 bisect results: each isolated node's own error on the real integer kernels and with Q/DQ
    in float (``emulated_<metric>``, recorded on ``ort:*:int8``), whom :func:`kernel_or_quantization`
    blames, the ``limit`` worst (by the worse of the two) first; [] when nothing was emulated."""
    tol = Tolerance(**result["tolerance"])
    rows = []
    for e in result.get("local_errors", []):
        metrics = {k: float(v) for k, v in e.get("metrics", {}).items() if isinstance(v, (int, float, str))}  # "nan"/"inf" as JSON writes them
        if f"emulated_{tol.metric}" not in metrics or tol.metric not in metrics:
            continue
        own = LocalError(e["node"], e["op_type"], e["index"], e.get("tensor", ""), metrics, bool(e.get("diverges")), bool(e.get("new_nonfinite")))
        real, emulated = metrics[tol.metric], metrics[f"emulated_{tol.metric}"]
        rows.append({"node": own.node, "op_type": own.op_type, "index": own.index, "real": real, "emulated": emulated,
                     "blame": kernel_or_quantization(own, tol)})

    def worse(row: dict) -> tuple:
        return min(_worse_first(row["real"], tol.metric), _worse_first(row["emulated"], tol.metric)), row["index"]

    return sorted(rows, key=worse)[:limit]


def _worse_first(value: float | None, metric: str) -> tuple:
    """Sort key, worst first: NaN, then the highest error (the lowest cosine/SNR), then no value."""
    if value is None:
        return (2, 0.0)
    if math.isnan(value):
        return (0, 0.0)
    return (1, value if metric in HIGHER_IS_BETTER else -value)


def _graph_link(overlays: GraphOverlays | None):
    """The template's ``graph_link(node, overlay)``: a Model Explorer URL on that node, or ""."""
    def link(node: str, prefer: str = "") -> str:
        return overlays.link(node, prefer) if overlays is not None and node in overlays.ids else ""
    return link


def render_report(runs: list[Run], title: str = "", graph: GraphOverlays | None = None) -> str:
    require("jinja2", "rendering the HTML report")
    import jinja2

    from aligner.version import __version__

    if not runs:
        raise InputError("Nothing to report: give at least one run directory.")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(resources.files("aligner.report").joinpath("template.html").read_text())
    models, seen = [], set()
    for run in runs:
        if run.model.get("path") not in seen:
            seen.add(run.model.get("path"))
            models.append(run.model)
    return template.render(
        title=title or ", ".join(Path(m.get("path", "?")).name for m in models),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
        models=models, runs=[_view(r, runs) for r in runs], fmt=_fmt, nf=_nf, yn=_yn,
        graph=graph.to_dict() if graph is not None else None, graph_files=[str(p) for p in graph.files] if graph else [],
        graph_link=_graph_link(graph), viewer_port=VIEWER_PORT,
    )


def write_report(run_dirs: list[str | Path], out: str | Path, force: bool = False, title: str = "",
                 graph: GraphOverlays | None = None) -> Path:
    """Render the run directories into one HTML file (atomically; never over a file without ``force``).
    With ``graph`` (written by :func:`aligner.report.graph_overlay.write_graph_overlays`), culprit and
    pinned nodes link to their place in Model Explorer and the page lists the overlays."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to overwrite it.")
    runs = [read_run(d) for d in run_dirs]
    write_atomic(out, render_report(runs, title, graph).encode())
    return out


__all__ = ["quantization_rows", "render_report", "write_report"]
