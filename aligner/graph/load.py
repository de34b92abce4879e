"""Load an ONNX model from disk with errors that say what is wrong with the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from aligner.errors import ModelLoadError
from aligner.plugin import register_schemas

log = logging.getLogger(__name__)

# Serialized protobufs are limited to 2 GiB; bigger models must keep weights in external files.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model (external data included) and validate it with the ONNX checker."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Model file not found: {path}. Check the path (cwd is {Path.cwd()}).")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; give the path of the .onnx file inside it.")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); the export or copy that wrote it did not finish.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({size} bytes): protobuf parsing failed ({exc}). "
            "It may be truncated (an interrupted download or export) or not an ONNX file at all."
        ) from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError(
            f"{path} parsed but holds no ONNX graph (ir_version={model.ir_version}, "
            f"{len(model.graph.node)} nodes): it is not an ONNX model, or it was truncated."
        )
    _load_external_data(model, path)
    register_schemas(model)  # a model with plugin nodes: the checker and shape inference must know them
    if check:
        check_model(model, path)
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        return
    base = path.parent
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        _check_inside(path, tensor.name, location)
        if not (base / location).exists():
            raise ModelLoadError(
                f"{path} keeps weight {tensor.name!r} in the external file {location!r}, "
                f"which is missing from {base}. Copy the model together with its data files."
            )
    try:
        load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"Could not read the external data of {path}: {exc}") from None


def _check_inside(path: Path, tensor: str, location: str) -> None:
    """ONNX reads external data only from files inside the model's folder (an absolute path or a
    ``..`` that leaves it is refused, a guard against reading arbitrary files): say so, and the fix."""
    base = path.parent.resolve()
    if (base / location).is_symlink():
        raise ModelLoadError(
            f"{path} keeps weight {tensor!r} in {location!r}, a symbolic link: ONNX reads external data only from regular "
            f"files inside the model's folder. Fix: replace the link with a copy of the file (cp --remove-destination "
            f"\"$(readlink -f {base / location})\" {base / location})."
        )
    target = Path(os.path.normpath(base / location))
    if os.path.isabs(location) or (target != base and base not in target.parents):
        raise ModelLoadError(
            f"{path} keeps weight {tensor!r} in the external file {location!r}, outside the model's folder {base}: "
            "ONNX reads external data only from files inside the model's folder (a relative path without '..'; "
            f"no absolute path). Fix: move {location!r} into {base} (or the model beside its data) and set the "
            f"location to the file's name ({Path(location).name!r}): onnx.load(model, load_external_data=False), edit each "
            "initializer's external_data 'location' entry, onnx.save; or re-export with the data beside the model."
        )


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Run the ONNX checker; models over 2 GiB are checked from their path."""
    register_schemas(model)
    try:
        if model_size(model) > PROTOBUF_LIMIT and path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ModelLoadError(
            f"{path or 'the model'} fails the ONNX checker: {first}. "
            "Re-export it, or pass --no-check to run it anyway."
        ) from None


def model_size(model: onnx.ModelProto) -> int:
    """Approximate serialized size in bytes, initializer data included.

    ``ModelProto.ByteSize()`` itself raises once a model passes 2 GiB, so the weights are summed
    apart from the rest of the graph.
    """
    weights = sum(len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
                  for t in model.graph.initializer)
    if weights > PROTOBUF_LIMIT:
        return weights
    g = model.graph  # the rest, part by part: ByteSize() of the whole walks the weights again (0.3 s for 170 MB)
    return weights + sum(m.ByteSize() for part in (g.node, g.value_info, g.input, g.output) for m in part) + \
        sum(f.ByteSize() for f in model.functions) + sum(t.ByteSize() - len(t.raw_data) for t in g.initializer if t.raw_data)
