"""Input tensors: deterministic random feeds, npz and Polygraphy JSON files, validation."""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import struct
import tempfile
import weakref
import zipfile
import zlib
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
                f"Input {info.name!r} has symbolic dims {info.shape_str()}; give the sizes your data has, e.g. "
                f"--input-shapes {info.name}:{example_shape(info)} (or --inputs FILE.npz: sizes from the data)."
            )
    return tuple(dims)


def example_shape(info: TensorInfo) -> str:
    """A concrete shape for ``info`` to show in a hint: its fixed dims as they are, a symbolic batch 1,
    the symbolic spatial dims of an image-like (rank 4) input 640, any other symbolic dim 128."""
    shape = info.shape or ()
    out = []
    for axis, d in enumerate(shape):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif axis == 0:
            out.append(1)
        else:
            out.append(640 if len(shape) == 4 and axis >= 2 else 128)
    return "x".join(map(str, out))


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
            strings = want.kind == "O" and array.dtype.kind in "US"  # a string input: .npz holds strings as unicode arrays
            if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu") and not strings:
                raise InputError(f"Input {info.name!r}: expected dtype {want}, given {array.dtype}.")
            array = array.astype(want)
        _warn_nonfinite(info.name, array)
        out[info.name] = array
    return out


_WARNED: dict[int, weakref.ref] = {}  # arrays already warned about (validation runs again in nested calls)


def _warn_nonfinite(name: str, array: np.ndarray) -> None:
    """Log (once per array) that an input holds NaN/inf: every comparison made from it says little."""
    if array.dtype.kind != "f" or array.size == 0:
        return
    known = _WARNED.get(id(array))
    if known is not None and known() is array:
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if not bad:
        return
    _WARNED[id(array)] = weakref.ref(array, lambda _, key=id(array): _WARNED.pop(key, None))
    share = "all" if bad == array.size else f"{bad} of"
    log.warning("Input %r: %s %d values are NaN or inf; outputs computed from them (and any verdict) say little "
                "about the model. Check the file or the preprocessing that made it.", name, share, array.size)


# What reading untrusted bytes as arrays can raise (numpy, zipfile, zlib and base64 do not share a base class).
_UNREADABLE = (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error, struct.error)


def load_inputs(path: str | os.PathLike) -> list[Feeds]:
    """Read input samples from ``.npz`` (one sample) or Polygraphy's JSON (a list of samples)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Inputs file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give an .npz or Polygraphy .json file (or --inputs-dir for a folder of .npz).")
    if path.suffix == ".npz":
        return [_load_npz(path)]
    if path.suffix == ".json":
        return _load_polygraphy_json(path)
    raise InputError(f"Unsupported inputs file {path.name!r}: use .npz or Polygraphy's .json (polygraphy run --save-inputs).")


def load_inputs_dir(path: str | os.PathLike) -> list[Feeds]:
    """Every sample in a folder: each ``.npz`` (one sample) and Polygraphy ``.json`` (its samples), by file name."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Inputs folder not found: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a folder; give it with --inputs (--inputs-dir takes a folder of .npz files).")
    files = sorted(f for f in path.iterdir() if f.suffix in (".npz", ".json") and f.is_file())
    if not files:
        raise InputError(f"{path} holds no .npz (or Polygraphy .json) files; save each sample with numpy.savez(path, **{{input_name: array}}).")
    return [s for f in files for s in load_inputs(f)]


def inputs_digest(samples: list[Feeds]) -> str:
    """A short content hash of input samples (names, dtypes, shapes and values), to tell runs on other inputs apart."""
    import hashlib

    h = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            a = np.ascontiguousarray(sample[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes() if a.dtype.kind != "O" else repr(a.tolist()).encode())
    return h.hexdigest()[:12]


def inputs_summary(samples: list[Feeds], source: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """What a run was given, for its record and the report: the file or folder name (or 'generated'),
    its absolute path, the number of samples, a short content hash and the first sample's shapes;
    two runs on other inputs never look alike."""
    shown = Path(source).name if source else f"generated (seed {seed})"
    return {"source": shown, "path": str(Path(source).resolve()) if source else None, "samples": len(samples),
            "sha256": inputs_digest(samples), "shapes": {k: list(np.shape(v)) for k, v in samples[0].items()} if samples else {}}


def _load_npz(path: Path) -> Feeds:
    what = "is not a readable .npz of arrays (truncated, or not made by numpy.savez?)"
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise InputError(f"{path} {what}: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds one bare .npy array, not an .npz of named arrays; "
                         f"save with numpy.savez(path, **{{input_name: array}}).")
    try:
        with data:
            feeds = {k: data[k] for k in data.files}
    except _UNREADABLE as exc:
        raise InputError(f"{path} {what}: {exc}") from None
    if not feeds:
        raise InputError(f"{path} holds no arrays; save the model's inputs with numpy.savez(path, **{{input_name: array}}).")
    return feeds


def _load_polygraphy_json(path: Path) -> list[Feeds]:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    samples = doc if isinstance(doc, list) else [doc]
    if not samples:
        raise InputError(f"{path} holds no samples (an empty list); expected a list of {{name: array}} objects "
                         "(Polygraphy's saved inputs, polygraphy run --save-inputs).")
    out = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict) or not sample:
            raise InputError(f"{path}: sample {i} is {type(sample).__name__ if sample else 'empty'}; expected a list of "
                             "{name: array} objects (Polygraphy's saved inputs, polygraphy run --save-inputs).")
        out.append({name: _decode_array(path, i, name, value) for name, value in sample.items()})
    return out


def _decode_array(path: Path, sample: int, name: str, value: object) -> np.ndarray:
    where = f"{path}: sample {sample}, entry {name!r}"
    if not isinstance(value, dict) or not isinstance(value.get("array"), str):
        raise InputError(f"{where} is not a Polygraphy-encoded array ({{'array': base64 of a .npy, 'polygraphy_class': 'ndarray'}}).")
    try:
        raw = base64.b64decode(value["array"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{where}: 'array' is not valid base64 ({exc}).") from None
    if not raw.startswith(b"\x93NUMPY"):
        raise InputError(f"{where}: the payload is not a .npy array (no .npy header); Polygraphy writes numpy.save bytes.")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except _UNREADABLE as exc:
        raise InputError(f"{where}: the payload is not a plain .npy array ({exc}).") from None


def save_inputs(samples: list[Feeds], path: str | os.PathLike, force: bool = False) -> Path:
    """Write samples atomically: ``.npz`` (first sample) or Polygraphy's JSON (all samples)."""
    path = Path(path)
    if not samples:
        raise InputError(f"No input samples to save to {path}.")
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it.")
    if path.suffix == ".json":
        doc = [{k: {"array": _b64(v), "polygraphy_class": "ndarray"} for k, v in s.items()} for s in samples]
        write_atomic(path, json.dumps(doc, indent=1).encode())
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as archive:  # numpy.savez's layout, without its reserved keyword names
            for name, value in samples[0].items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
        write_atomic(path, buf.getvalue())
    return path


def _b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path`` then rename, so readers never see half a file. The file
    gets the permissions a plain ``open`` would give it (0666 less the umask)."""
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(path: Path) -> None:
    """An InputError when ``path`` cannot be a file: it is a folder, or a folder above it is a file."""
    if path.is_dir():
        raise InputError(f"Cannot write {path}: it is a folder; give a file path.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"Cannot write {path}: {parent} is a file, not a folder.")
            return


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
