"""aligner's per-node evidence as Model Explorer overlays ("node data"), one JSON file per quantity.

Model Explorer (google-ai-edge/model-explorer, the ``ai-edge-model-explorer`` package) colours the
nodes of a graph from node-data files. aligner writes its ``GraphNodeData`` form
(``model_explorer/node_data_builder.py``), which the viewer applies to the graph it shows::

    {"results": {"<node id>": {"value": 0.031 or "text", "bgColor": "#rrggbb"}, ...}}

``value`` is what the side panel and the node-data table show; ``bgColor`` fills the node and takes
precedence over the file's ``thresholds``/``gradient``, which are linear in the value. aligner
colours each node itself, so errors sit on a log scale around the tolerance and categories get
fixed colours. The viewer lists each file under its file name, so the names say what they show:

  first-divergence.json   the first divergent node, the divergent nodes downstream of it, divergent
                          nodes that are not (another source), compared nodes within tolerance
  accumulated-error.json  each node's worst output error vs the reference, end to end (compare)
  local-error.json        each isolated node's own error on the reference's inputs (bisect)
  nan-inf.json            where NaN/inf first appear, and the nodes that carry them on
  fp32-pins.json          the precision plan's FP32 nodes, each with its reason
  fused-kernels.json      the fused kernel each original node belongs to, when a run records it as
                          result["fused_kernels"] = [{"name": kernel, "op_type": ..., "originals": [node, ...]}, ...]
  overlays.json           the index: model, files, legends, aligner name -> viewer id, command

A file is written only when the runs hold its evidence. With runs of several targets, each file
name gets the target (``accumulated-error.emu-fp16.json``). Keys are the viewer's node ids
(:mod:`aligner.report.graph_ids`), so unnamed and duplicated nodes land where the viewer draws them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import onnx

from aligner.errors import InputError, ModelLoadError
from aligner.inputs import write_atomic
from aligner.report.graph_ids import graph_id, viewer_node_ids
from aligner.report.node_data import FIRST, NONFINITE, PIN, Overlay, overlays_of
from aligner.report.runs import Run, read_run

ADAPTER_ID = "onnx_adapter"  # model-explorer-onnx's adapter, as Model Explorer registers it
ADAPTER_EXTENSION = "model_explorer_onnx"
VIEWER_PORT = 8080  # Model Explorer's default port
INDEX = "overlays.json"

PER_NODE_KINDS = ("compare", "bisect", "precision")


@dataclass(frozen=True)
class GraphOverlays:
    """Overlays for one model, and how to open them."""

    model: Path
    graph: str  # the viewer's id of the main graph
    directory: Path
    overlays: tuple[Overlay, ...]
    ids: dict[str, str]  # aligner node name -> viewer node id
    notes: tuple[str, ...] = ()

    @property
    def files(self) -> list[Path]:
        return [self.directory / f"{o.name}.json" for o in self.overlays]

    def command(self) -> str:
        """The shell command that opens the model with every overlay in Model Explorer."""
        paths = ",".join(str(p) for p in self.files)
        data = f" --node_data_paths={shlex.quote(paths)}" if self.files else ""
        return f"model-explorer {shlex.quote(str(self.model))} --extensions={ADAPTER_EXTENSION}{data}"

    def link(self, node: str = "", prefer: str = "", port: int = VIEWER_PORT, host: str = "localhost") -> str:
        """A Model Explorer URL that loads the model and overlays and selects ``node`` (revealed and
        centred). The viewer shows the overlay it loaded last, so the one whose name starts with
        ``prefer`` (and holds the node) goes last. Works with any Model Explorer that has the ONNX
        adapter on ``host:port``: the URL carries the files' paths, which that server reads."""
        order = sorted(range(len(self.overlays)), key=lambda i: (self.overlays[i].name.startswith(prefer or "\0"),
                                                                   node in self.overlays[i].values, i))
        return deep_link(self.model, [self.files[i] for i in order], self.ids.get(node, ""), self.graph, f"http://{host}:{port}")

    def focus(self) -> tuple[str, str]:
        """The node to show first and its overlay: the first divergence, else the NaN/inf origin,
        else the first FP32 pin; ("", "") when there is none."""
        for overlay in self.overlays:
            for colour, prefix in ((FIRST, "first-divergence"), (NONFINITE, "nan-inf"), (PIN, "fp32-pins")):
                if overlay.name.startswith(prefix):
                    node = next((n for n, (_, c) in overlay.values.items() if c == colour), "")
                    if node in self.ids:
                        return node, overlay.name
        return "", ""

    def to_dict(self) -> dict:
        return {
            "model": str(self.model), "graph": self.graph, "command": self.command(), "notes": list(self.notes),
            "overlays": [{"file": f.name, "title": o.title, "description": o.description, "nodes": len(o.values),
                          "legend": [list(x) for x in o.legend]} for o, f in zip(self.overlays, self.files)],
            "viewer_ids": {n: self.ids[n] for o in self.overlays for n in o.values if n in self.ids},
        }


def deep_link(model: str | Path, node_data: list[Path], node_id: str = "", graph: str = "", base_url: str = f"http://localhost:{VIEWER_PORT}") -> str:
    """Model Explorer's URL form (its ``?data=`` JSON: models, node data, and the pane's UI state)."""
    data: dict = {"models": [{"url": str(model), "adapterId": ADAPTER_ID}]}
    if node_data:
        data["nodeData"] = [str(p) for p in node_data]
        data["nodeDataTargets"] = [""] * len(node_data)
    if node_id:
        data["uiState"] = {"paneStates": [{"deepestExpandedGroupNodeIds": [], "selectedNodeId": node_id, "selectedGraphId": graph,
                                           "selectedCollectionLabel": "", "widthFraction": 1}]}
    return f"{base_url}/?data={quote(json.dumps(data), safe='')}"


def write_graph_overlays(run_dirs: list[str | Path], directory: str | Path, model: str | Path | None = None,
                         force: bool = False) -> GraphOverlays:
    """Read run directories and write their overlays (and ``overlays.json``) into ``directory``;
    refuses a non-empty folder without ``force``. Each file is written atomically."""
    directory = Path(directory)
    check_overlay_dir(directory, force)
    result = graph_overlays([read_run(d) for d in run_dirs], directory, model)
    for overlay, path in zip(result.overlays, result.files):
        write_atomic(path, json.dumps(overlay.node_data(result.ids), indent=1).encode())
    write_atomic(directory / INDEX, json.dumps(result.to_dict(), indent=1).encode())
    return result


def check_overlay_dir(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; --graph takes a folder for the node-data files.")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise InputError(f"{directory} exists and is not empty; choose another folder, or pass --force to overwrite its overlays.")


def graph_overlays(runs: list[Run], directory: Path, model: str | Path | None = None) -> GraphOverlays:
    """The overlays of ``runs`` (compare, bisect, precision; others carry no per-node evidence)."""
    per_node = [r for r in runs if r.kind in PER_NODE_KINDS]
    if not per_node:
        raise InputError(f"None of the runs has per-node evidence (kinds: {', '.join(sorted({r.kind for r in runs}))}); "
                         "give a compare, bisect or precision run.")
    path = resolve_model(per_node, model)
    proto = read_structure(path)
    ids = viewer_node_ids(proto)
    overlays = overlays_of(per_node, proto)
    notes = _notes(per_node, overlays, ids, path, proto, directory)
    return GraphOverlays(path.resolve(), graph_id(proto), directory.resolve(), tuple(overlays), ids, tuple(notes))


def resolve_model(runs: list[Run], model: str | Path | None = None) -> Path:
    """The ONNX file the runs analysed: ``model`` when given, else the path each run recorded."""
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"Model file not found: {path}.")
        return path
    found = {}
    for run in runs:
        tried = [run.meta.get("model_path"), run.meta.get("model")]
        path = next((Path(p) for p in tried if p and p != "<in-memory>" and Path(p).is_file()), None)
        if path is None:
            raise InputError(f"{run.path}: the model it analysed ({run.meta.get('model')!r}) is not found from {Path.cwd()}; "
                             "pass --model FILE.onnx.")
        found.setdefault(path.resolve(), run.path)
    if len(found) > 1:
        listing = "; ".join(f"{m} ({r})" for m, r in found.items())
        raise InputError(f"The runs analysed different models ({listing}): overlays are per model, so give one model's runs at a time.")
    return next(iter(found))


def read_structure(path: Path) -> onnx.ModelProto:
    """The graph without its weights (external data is not read), as Model Explorer's adapter reads it."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file, truncated, or over 2 GiB
        raise ModelLoadError(f"{path} cannot be read as ONNX ({exc}); Model Explorer's ONNX adapter, which reads it the same "
                             "way (onnx.load without external data), cannot show it either.") from None


def _notes(runs: list[Run], overlays: list[Overlay], ids: dict[str, str], path: Path, proto: onnx.ModelProto,
           directory: Path) -> list[str]:
    notes = []
    missing = sorted({n for o in overlays for n in o.values if n not in ids})
    if missing:
        notes.append(f"{len(missing)} node(s) of the runs are not in {path} (e.g. {', '.join(missing[:3])}): was the model changed "
                     "after the runs? They are left out of the overlays.")
    recorded = {r.model.get("nodes") for r in runs} - {None}
    if recorded and len(proto.graph.node) not in recorded:
        notes.append(f"{path} has {len(proto.graph.node)} nodes; the runs saw {', '.join(map(str, sorted(recorded)))}.")
    renamed = sum(1 for n, v in ids.items() if n != v)
    if renamed:
        notes.append(f"{renamed} node(s) have no unique name in the file; Model Explorer calls them node, node_1, ... or NAME_1 "
                     "(overlays.json maps aligner's names to those ids).")
    if "," in f"{path.resolve()}{directory.resolve()}":
        notes.append("model-explorer splits its arguments on commas and a path here has one: open them with `aligner view` instead.")
    if not overlays:
        notes.append("The runs hold no per-node evidence to draw (no tensors compared, no divergence, no pins).")
    return notes


__all__ = ["ADAPTER_EXTENSION", "ADAPTER_ID", "GraphOverlays", "VIEWER_PORT", "check_overlay_dir", "deep_link", "graph_overlays",
           "read_structure", "resolve_model", "write_graph_overlays"]
