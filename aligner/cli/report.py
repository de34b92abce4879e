"""``aligner report``: render run directories into one self-contained HTML page."""

from __future__ import annotations

import argparse

from aligner.cli.common import check_writable
from aligner.report import write_report

EPILOG = """\
A run directory is written by any analysis command with --run DIR (or beside --report FILE.html):
meta.json, model.json, result.json and, for precision, trials.jsonl. Give several to put, e.g., the
compare, bisect and precision runs of one model on one page (the bisect's root cause is then
marked on the compare chart).

examples:
  aligner compare model.onnx --run runs/compare
  aligner bisect model.onnx --run runs/bisect
  aligner precision model.onnx --run runs/precision
  aligner report runs/compare runs/bisect runs/precision -o report.html

The page has no external scripts, fonts or styles: it opens offline, e.g. from a mail attachment.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="render run directories into one HTML page",
                       description="Render one or more run directories into one self-contained HTML accuracy report.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (written with --run or --report)")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="the report file to write")
    p.add_argument("--title", default="", help="page title (default: the model file names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")


def run(args: argparse.Namespace) -> int:
    check_writable([args.output], args.force)
    out = write_report(args.runs, args.output, force=args.force, title=args.title)
    print(f"report: {out}")
    return 0
