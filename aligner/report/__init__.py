"""The HTML accuracy report: run directories in, one self-contained page out.

matplotlib and jinja2 (the ``report`` extra) are imported only when a report is rendered.
"""

from aligner.report.runs import Run, model_summary, read_run, write_run

__all__ = ["Run", "model_summary", "read_run", "render_report", "write_report", "write_run"]


def render_report(runs, title: str = "") -> str:
    from aligner.report.html import render_report as render

    return render(runs, title)


def write_report(run_dirs, out, force: bool = False, title: str = ""):
    from aligner.report.html import write_report as write

    return write(run_dirs, out, force, title)
