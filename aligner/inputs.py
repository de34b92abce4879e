"""Input tensors: deterministic random feeds, npz and Polygraphy JSON files, validation."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from aligner.errors import InputError, close_matches
from aligner.graph.model import ModelGraph, TensorInfo, numpy_dtype

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["images:1x3x800x800", "mask:1x800x800"]`` -> {name: shape}."""
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"Bad --input-shapes entry {spec!r}; write NAME:DxDxD, e.g. images:1x3x800x800.") from None
    return shapes


def _resolve_shape(info: TensorInfo, given: tuple[int, ...] | None) -> tuple[int, ...]:
    if given is not None:
        _check_shape(info, given)
        return given
    if info.shape is None:
        raise InputError(f"Input {info.name!r} has an unknown rank; give its shape: --input-shapes {info.name}:1x3x224x224")
    dims = []
    for axis, d in enumerate(info.shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif axis == 0:
            log.warning("Input %r: symbolic batch dim %r set to 1 (override with --input-shapes)", info.name, d)
            dims.append(1)
        else:
            raise InputError(
                f"Input {info.name!r} has symbolic dims {info.shape_str()}; give concrete sizes, "
                f"e.g. --input-shapes {info.name}:" + "x".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in info.shape)
            )
    return tuple(dims)


def _check_shape(info: TensorInfo, given: tuple[int, ...]) -> None:
    if info.shape is None:
        return
    expected = info.shape_str()
    if len(given) != len(info.shape) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(info.shape, given)):
        raise InputError(f"Input {info.name!r}: expected shape {expected}, given {'x'.join(map(str, given)) or 'scalar'}.")


def make_inputs(graph: ModelGraph, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> Feeds:
    """Deterministic random inputs: floats uniform in [0, 1), integers in [0, 8), bools 50/50."""
    shapes = shapes or {}
    for name in shapes:
        if name not in graph.input_names:
            raise InputError(_unknown_input(name, graph))
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in graph.input_infos():
        shape = _resolve_shape(info, shapes.get(info.name))
        dtype = numpy_dtype(info.elem_type) if info.elem_type else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[info.name] = rng.random(shape, dtype=np.float64).astype(dtype)
        elif dtype.kind in "iu":
            feeds[info.name] = rng.integers(0, 8, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[info.name] = rng.random(shape) < 0.5
        else:
            raise InputError(f"Cannot generate input {info.name!r} of type {info.dtype_name}; pass --inputs file.npz.")
    return feeds


def _unknown_input(name: str, graph: ModelGraph) -> str:
    matches = close_matches(name, graph.input_names)
    hint = f" Did you mean: {matches[0]!r}?" if matches else ""
    return f"The model has no input {name!r}; its inputs are {graph.input_names}.{hint}"


def validate_feeds(graph: ModelGraph, feeds: Feeds) -> Feeds:
    """Check names, shapes and dtypes against the model; returns feeds in the model's dtypes."""
    out = {}
    for name in feeds:
        if name not in graph.input_names:
            raise InputError(_unknown_input(name, graph))
    for info in graph.input_infos():
        if info.name not in feeds:
            raise InputError(f"Input {info.name!r} is missing from the given inputs (have {sorted(feeds)}).")
        array = np.asarray(feeds[info.name])
        _check_shape(info, tuple(array.shape))
        want = numpy_dtype(info.elem_type) if info.elem_type else array.dtype
        if array.dtype != want:
            if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
                raise InputError(f"Input {info.name!r}: expected dtype {want}, given {array.dtype}.")
            array = array.astype(want)
        out[info.name] = array
    return out


def load_inputs(path: str | os.PathLike) -> list[Feeds]:
    """Read input samples from ``.npz`` (one sample) or Polygraphy's JSON (a list of samples)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Inputs file not found: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return [{k: data[k] for k in data.files}]
        except (ValueError, OSError) as exc:
            raise InputError(f"{path} is not a readable .npz of arrays: {exc}") from None
    if path.suffix == ".json":
        return _load_polygraphy_json(path)
    raise InputError(f"Unsupported inputs file {path.name!r}: use .npz or Polygraphy's .json (polygraphy run --save-inputs).")


def _load_polygraphy_json(path: Path) -> list[Feeds]:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    samples = doc if isinstance(doc, list) else [doc]
    out = []
    for sample in samples:
        if not isinstance(sample, dict):
            raise InputError(f"{path}: expected a list of {{name: array}} objects (Polygraphy's saved inputs).")
        feeds = {}
        for name, value in sample.items():
            if not isinstance(value, dict) or "array" not in value:
                raise InputError(f"{path}: entry {name!r} is not a Polygraphy-encoded array.")
            feeds[name] = np.load(io.BytesIO(base64.b64decode(value["array"])), allow_pickle=False)
        out.append(feeds)
    return out


def save_inputs(samples: list[Feeds], path: str | os.PathLike, force: bool = False) -> Path:
    """Write samples atomically: ``.npz`` (first sample) or Polygraphy's JSON (all samples)."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it.")
    if path.suffix == ".json":
        doc = [{k: {"array": _b64(v), "polygraphy_class": "ndarray"} for k, v in s.items()} for s in samples]
        write_atomic(path, json.dumps(doc, indent=1).encode())
    else:
        buf = io.BytesIO()
        np.savez(buf, **samples[0])
        write_atomic(path, buf.getvalue())
    return path


def _b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path`` then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
