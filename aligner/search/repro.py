"""``--save-repro``: the smallest piece of the model around the root cause, standalone.

For a ``local``, ``nonfinite`` or ``discrete`` cause the piece is the culprit node alone (with the
constants it reads); for ``inherited`` error it is the chain of isolated ancestors that built the
error up. Its boundary inputs carry the reference's values, so the piece reproduces the
divergence by itself; this is checked before the verdict is returned.
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from aligner.compare.layerwise import compare
from aligner.errors import InputError
from aligner.graph.decouple import boundary_inputs, subgraph_model
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.inputs import write_atomic
from aligner.search.verdict import LocalError, Repro, RootCause

if TYPE_CHECKING:
    from aligner.search.probes import BisectRun


def check_repro_dir(directory: Path, force: bool) -> None:
    """Refuse a non-empty folder unless ``force`` (checked before any long work)."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--save-repro {directory}: exists and is not a folder.")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise InputError(f"--save-repro {directory}: folder is not empty; pass --force to overwrite its files.")


def write_repro(run: "BisectRun", cause: RootCause, locals_: list[LocalError], directory: Path, fp32_nodes: list[str]) -> Repro:
    directory = Path(directory).resolve()  # the README's command works from any folder
    graph, other = run.graph, run.other
    nodes = [cause.node] if cause.kind != "inherited" else _chain(graph, cause.node, {e.node for e in locals_})
    nodes = [n for n in nodes if n in other.node_by_name]
    outputs = [o for o in graph.node(cause.node).output if o and o in other.tensors]
    inputs = list(dict.fromkeys(boundary_inputs(other, nodes) + boundary_inputs(graph, nodes)))
    ref = run.ref.run(run.feeds, inputs + outputs)
    values = {t: ref[t] for t in inputs}
    target_piece = subgraph_model(other, nodes, ref, outputs=outputs)
    reference_piece = subgraph_model(graph, nodes, ref, outputs=outputs) if other is not graph else None
    for piece in (target_piece, reference_piece):
        if piece is not None:
            onnx.checker.check_model(piece)  # a repro must load anywhere

    directory.mkdir(parents=True, exist_ok=True)
    _save_model(target_piece, directory / "model.onnx")
    if reference_piece is not None:
        _save_model(reference_piece, directory / "reference.onnx")
    _save_npz(values, directory / "inputs.npz")
    _save_npz({t: ref[t] for t in outputs}, directory / "expected.npz")

    target = run.target.with_pins([n for n in fp32_nodes if n in nodes])
    if target.is_quantized:  # the piece calibrates on its own inputs' reference values over the model's calibration samples
        target = target.with_options({"calib": str(_piece_calibration(run, target, target_piece, directory / "calib"))})
    check = compare(
        ModelGraph(reference_piece or target_piece), target=target, feeds=values, tolerance=run.tol,
        target_model=ModelGraph(target_piece) if reference_piece is not None else None,
    )
    reproduces = any(t.diverges for t in check.tensors if t.tensor in outputs)
    quoted = shlex.quote(str(target))
    if reference_piece is not None:
        command = f"aligner compare {_q(directory / 'reference.onnx')} --target-model {_q(directory / 'model.onnx')} --inputs {_q(directory / 'inputs.npz')} --target {quoted}"
    else:
        command = f"aligner compare {_q(directory / 'model.onnx')} --inputs {_q(directory / 'inputs.npz')} --target {quoted}"
    write_atomic(directory / "README.md", _readme(cause, nodes, command, reproduces).encode())
    return Repro(str(directory / "model.onnx"), str(directory / "inputs.npz"),
                 str(directory / "reference.onnx") if reference_piece is not None else None, command, reproduces, tuple(nodes))


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _piece_calibration(run: "BisectRun", target, piece: onnx.ModelProto, folder: Path) -> Path:
    """One .npz per calibration sample of the whole model (``target``'s calib, else the generated inputs
    it calibrates on), holding the reference's values of the piece's inputs: ONNX Runtime's quantizer
    then sets the scales the whole model's calibration gave those tensors."""
    from aligner.quant.calib import load_calibration

    constants = {t.name for t in piece.graph.initializer}
    names = [i.name for i in piece.graph.input if i.name not in constants]
    calibration = load_calibration(run.graph, target.option_dict.get("calib"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for i, sample in enumerate(calibration.samples):
        _save_npz(run.ref.run(sample, names), folder / f"{i:04d}.npz")
    return folder


def _chain(graph: ModelGraph, start: str, allowed: set[str]) -> list[str]:
    """``start`` and its ancestors among ``allowed``, in topological order."""
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name in seen or name not in allowed:
            continue
        seen.add(name)
        for t in _node_inputs(graph.node(name)):
            src = graph.producer.get(t)
            if src is not None:
                stack.append(src.name)
    return sorted(seen, key=graph.index_of.__getitem__)


def _save_model(model: onnx.ModelProto, path: Path) -> None:
    write_atomic(path, model.SerializeToString())


def _save_npz(values: dict[str, np.ndarray], path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, **values)
    write_atomic(path, buf.getvalue())


def _readme(cause: RootCause, nodes: list[str], command: str, reproduces: bool) -> str:
    status = "reproduces the divergence on its own (checked)" if reproduces else "does NOT reproduce the divergence on its own"
    listed = "\n".join(f"- `{n}`" for n in nodes)
    calib = ("\n\n`calib/` holds the piece's calibration data: the reference's values of its inputs on each calibration "
             "sample of the whole model, so the quantizer gives them the scales it gave them there."
             if "calib=" in command else "")
    return (f"# Repro of a divergence found by aligner bisect\n\nRoot cause: `{cause.node}` ({cause.op_type}), kind "
            f"`{cause.kind}`.\n\n{cause.reason}\n\nNodes in this piece:\n{listed}\n\n`inputs.npz` holds the reference's values of "
            f"its inputs, `expected.npz` the reference's outputs.{calib} This piece {status}; the command uses absolute paths, "
            f"so it runs from any folder:\n\n    {command}\n")
