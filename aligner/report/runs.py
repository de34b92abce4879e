"""Run directories: what an analysis command leaves behind for the report (JSON, never tensors).

    RUN/meta.json      {"kind": "compare" | "bisect" | "precision" | "eval" | "bench", "created", "aligner", "model",
                        "model_path" (absolute; absent for an in-memory model), "inputs" (when known: source
                        file or folder name, samples, a short content hash, shapes)}
    RUN/model.json     model summary (opset, I/O, node count, op histogram)
    RUN/result.json    the command's result (CompareResult / BisectResult / PrecisionPlan .to_dict())
    RUN/trials.jsonl   precision only: the trials log
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import write_atomic

KINDS = ("compare", "bisect", "precision", "eval", "bench")


@dataclass(frozen=True)
class Run:
    path: Path
    kind: str
    meta: dict
    model: dict
    result: dict
    trials: tuple[dict, ...] = ()


def model_summary(graph: ModelGraph) -> dict:
    def io(names):
        return [{"name": n, "dtype": graph.tensors[n].dtype_name if n in graph.tensors else "?",
                 "shape": graph.tensors[n].shape_str() if n in graph.tensors else "?"} for n in names]

    return {"path": str(graph.path or "<in-memory>"), "opset": graph.opset, "nodes": len(graph.nodes),
            "inputs": io(graph.input_names), "outputs": io(graph.output_names),
            "op_histogram": dict(graph.op_histogram().most_common())}


def write_run(directory: str | Path, kind: str, graph: ModelGraph, result: dict, trials: Path | None = None,
              force: bool = False, inputs: dict | None = None) -> Path:
    """Write one run directory; refuses a non-empty folder that is not an aligner run unless ``force``.
    ``inputs`` says what the run was given (:func:`aligner.inputs.inputs_summary`), shown in the report."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / "meta.json").exists() and not force:
        raise InputError(f"{directory} exists and is not an aligner run directory; choose another, or pass --force.")
    directory.mkdir(parents=True, exist_ok=True)
    from aligner.version import __version__

    meta = {"kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "aligner": __version__,
            "model": str(graph.path or "<in-memory>")}
    if graph.path is not None:  # where `report --graph` and `view` find the model from any folder
        meta["model_path"] = str(Path(graph.path).resolve())
    if inputs:
        meta["inputs"] = inputs
    write_atomic(directory / "meta.json", json.dumps(meta, indent=1).encode())
    write_atomic(directory / "model.json", json.dumps(model_summary(graph), indent=1).encode())
    write_atomic(directory / "result.json", json.dumps(result, indent=1).encode())
    if trials is not None and Path(trials).exists() and Path(trials).resolve() != (directory / "trials.jsonl").resolve():
        shutil.copyfile(trials, directory / "trials.jsonl")
    return directory


def read_run(directory: str | Path) -> Run:
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise InputError(f"{directory} is not an aligner run directory (no meta.json). Runs are written by "
                         "`aligner compare|bisect|precision ... --run DIR` or `--report FILE.html`.")
    try:
        meta = json.loads(meta_path.read_text())
        model = json.loads((directory / "model.json").read_text())
        result = json.loads((directory / "result.json").read_text())
        trials_path = directory / "trials.jsonl"
        lines = trials_path.read_text().splitlines()[1:] if trials_path.exists() else []
        trials = tuple(json.loads(line) for line in lines if line.strip())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{directory}: unreadable run file ({exc}).") from None
    if meta.get("kind") not in KINDS:
        raise InputError(f"{directory}: unknown run kind {meta.get('kind')!r} (expected one of {KINDS}).")
    return Run(directory, meta["kind"], meta, model, result, trials)


__all__ = ["KINDS", "Run", "model_summary", "read_run", "write_run"]
