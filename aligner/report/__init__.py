"""The HTML accuracy report: run directories in, one self-contained page out; and Model Explorer
overlays (node data) of the same runs (:mod:`aligner.report.graph_overlay`).

matplotlib and jinja2 (the ``report`` extra) are imported only when a report is rendered.
"""

from aligner.report.graph_overlay import GraphOverlays, write_graph_overlays
from aligner.report.runs import Run, model_summary, read_run, write_run

__all__ = ["GraphOverlays", "Run", "model_summary", "read_run", "render_report", "write_graph_overlays", "write_report", "write_run"]


def render_report(runs, title: str = "", graph: GraphOverlays | None = None) -> str:
    from aligner.report.html import render_report as render

    return render(runs, title, graph)


def write_report(run_dirs, out, force: bool = False, title: str = "", graph: GraphOverlays | None = None):
    from aligner.report.html import write_report as write

    return write(run_dirs, out, force, title, graph)
