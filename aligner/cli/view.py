"""``aligner view``: open the runs' model in Model Explorer with aligner's overlays on its nodes."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import webbrowser
from pathlib import Path

from aligner.errors import InputError, unknown_name_message
from aligner.report.graph_overlay import VIEWER_PORT, check_overlay_dir, write_graph_overlays
from aligner.report.viewer import ViewerError, adapter_notes, check_viewer, pick_port, serve

EPILOG = f"""\
Needs the view extra: pip install 'aligner[view]' (Model Explorer and its ONNX adapter).

The overlays are the ones `aligner report RUN... --graph DIR` writes: first divergence, accumulated
and local error per node (log scale), NaN/inf origin, FP32 pins with their reasons, fused kernels.
The page opens on the first divergent node (or the NaN/inf origin, or the first pin); pick another
overlay under "Node data providers" in the side panel. Ctrl+C stops the server.

examples:
  aligner compare model.onnx --target emu:fp16 --run runs/compare
  aligner bisect model.onnx --target emu:fp16 --run runs/bisect
  aligner view runs/compare runs/bisect
  aligner view runs/precision --graph overlays/ --port 8090 --no-browser

Without --graph the node-data files live in a temporary folder for as long as the server runs.
The server listens on {VIEWER_PORT} (or the next free port) of localhost.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="open the model in Model Explorer with per-node error, NaN and pin overlays",
                       description="Start Model Explorer (Google's model graph viewer) on the runs' model with aligner's "
                                   "per-node overlays, opened on the culprit node.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of one model (written with --run or --report)")
    p.add_argument("--model", metavar="ONNX", help="the model file, when the path the runs recorded has moved")
    p.add_argument("--graph", metavar="DIR", help="keep the node-data files in this folder (default: a temporary one)")
    p.add_argument("--force", action="store_true", help="overwrite the overlays in a non-empty --graph folder")
    p.add_argument("--node", metavar="NAME", help="open on this node (default: the first divergence, NaN origin or first pin)")
    p.add_argument("--host", default="localhost", help="address to serve on (default localhost)")
    p.add_argument("--port", type=int, help=f"port to serve on (default {VIEWER_PORT}, or the next free one)")
    p.add_argument("--no-browser", action="store_true", help="print the URL; do not open a browser")


def run(args: argparse.Namespace) -> int:
    check_viewer()  # before any work: the error names pip install 'aligner[view]'
    if args.graph:
        check_overlay_dir(Path(args.graph), args.force)
    port = pick_port(args.host, args.port or VIEWER_PORT, explicit=args.port is not None)
    directory = Path(args.graph) if args.graph else Path(tempfile.mkdtemp(prefix="aligner-view-"))
    keep = bool(args.graph)
    try:
        overlays = write_graph_overlays(args.runs, directory, args.model, force=args.force)
        node, prefer = overlays.focus()
        if args.node:
            if args.node not in overlays.ids:
                raise InputError(unknown_name_message("node", args.node, overlays.ids))
            node, prefer = args.node, ""
        try:
            notes = overlays.notes + tuple(adapter_notes(overlays))
        except ViewerError:
            keep = True  # the files are the deliverable when the viewer cannot show the model
            raise
        for note in notes:
            print(f"note: {note}")
        print(f"overlays: {', '.join(p.name for p in overlays.files) or '(none)'} in {overlays.directory}")
        print("starting Model Explorer (Ctrl+C stops it)...", flush=True)
        serve(overlays, args.host, port, node, prefer, on_ready=lambda url: _ready(url, node, not args.no_browser))
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _ready(url: str, node: str, open_browser: bool) -> None:
    print(f"\naligner view: {'open on ' + node if node else 'open'}:\n{url}\n", flush=True)
    if open_browser:
        webbrowser.open_new_tab(url)
