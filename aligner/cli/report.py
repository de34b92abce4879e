"""``aligner report``: render run directories into one self-contained HTML page, and/or write
Model Explorer overlays (node data) of the same runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from aligner.cli.common import check_writable
from aligner.errors import InputError
from aligner.report import write_graph_overlays, write_report
from aligner.report.graph_overlay import check_overlay_dir

EPILOG = """\
A run directory is written by any analysis command with --run DIR (or beside --report FILE.html):
meta.json, model.json, result.json and, for precision, trials.jsonl. Give several to put, e.g., the
compare, bisect and precision runs of one model on one page (the bisect's root cause is then
marked on the compare chart).

--graph writes one Model Explorer node-data file per quantity (first divergence, accumulated and
local error per node on a log scale, NaN/inf origin, FP32 pins with reasons, fused kernels), prints
the command that opens the model with them, and links the page's culprit and pinned nodes to their
place in the viewer. It needs no extra; viewing them needs pip install 'aligner[view]'.

examples:
  aligner compare model.onnx --run runs/compare
  aligner bisect model.onnx --run runs/bisect
  aligner precision model.onnx --run runs/precision
  aligner report runs/compare runs/bisect runs/precision -o report.html
  aligner report runs/compare runs/bisect -o report.html --graph      overlays in report.graph/
  aligner report runs/bisect --graph overlays/                        overlays only

The page has no external scripts, fonts or styles: it opens offline, e.g. from a mail attachment.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="render run directories into one HTML page (and Model Explorer overlays)",
                       description="Render one or more run directories into one self-contained HTML accuracy report, "
                                   "and/or write their per-node overlays for Model Explorer.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (written with --run or --report)")
    p.add_argument("-o", "--output", metavar="HTML", help="the report file to write")
    p.add_argument("--graph", nargs="?", const="", metavar="DIR",
                   help="write Model Explorer overlays into DIR (default: REPORT.graph/ beside the report; ./graph-overlays without -o)")
    p.add_argument("--model", metavar="ONNX", help="with --graph: the model file, when the path the runs recorded has moved")
    p.add_argument("--title", default="", help="page title (default: the model file names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report / overlay files")


def run(args: argparse.Namespace) -> int:
    if not args.output and args.graph is None:
        raise InputError("Nothing to write: give -o REPORT.html, --graph [DIR], or both.")
    graph_dir = None
    if args.graph is not None:
        graph_dir = Path(args.graph or (Path(args.output).with_suffix(".graph") if args.output else "graph-overlays"))
    check_writable([args.output], args.force)
    if graph_dir is not None:
        check_overlay_dir(graph_dir, args.force)
    overlays = write_graph_overlays(args.runs, graph_dir, args.model, force=args.force) if graph_dir is not None else None
    if args.output:
        out = write_report(args.runs, args.output, force=args.force, title=args.title, graph=overlays)
        print(f"report: {out}")
    if overlays is not None:
        for note in overlays.notes:
            print(f"note: {note}")
        print(f"graph overlays: {', '.join(p.name for p in overlays.files) or '(none)'} in {overlays.directory}")
        print("open them in Model Explorer (pip install 'aligner[view]'; or: aligner view RUN_DIR...):")
        print(f"  {overlays.command()}")
    return 0
