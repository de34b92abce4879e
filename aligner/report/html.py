"""One self-contained HTML page from one or more run directories.

Every string from a model (node, tensor and op names, reasons quoting them) goes through Jinja2's
autoescaping; the only unescaped content is the SVG matplotlib draws, whose text is glyph paths.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from aligner._optional import require
from aligner.errors import InputError
from aligner.inputs import write_atomic
from aligner.report.charts import latency_throughput_chart, layer_error_chart, trials_chart
from aligner.report.runs import Run, read_run


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
    elif run.kind == "precision" and run.trials:
        view["chart"] = trials_chart(list(run.trials))
    elif run.kind == "bench" and run.result.get("rows"):
        view["chart"] = latency_throughput_chart(run.result["rows"])
    return view


def render_report(runs: list[Run], title: str = "") -> str:
    require("jinja2", "rendering the HTML report")
    import jinja2

    from aligner import __version__

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
    )


def write_report(run_dirs: list[str | Path], out: str | Path, force: bool = False, title: str = "") -> Path:
    """Render the run directories into one HTML file (atomically; never over a file without ``force``)."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to overwrite it.")
    runs = [read_run(d) for d in run_dirs]
    write_atomic(out, render_report(runs, title).encode())
    return out


__all__ = ["render_report", "write_report"]
