"""Issue 20: every bad inputs file is an InputError with a clear message, NaN inputs are warned
about, and written files get the user's umask."""

from __future__ import annotations

import base64
import io
import json
import logging
import os

import numpy as np
import pytest

from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import load_inputs, save_inputs, validate_feeds, write_atomic


def _npy_b64(array: np.ndarray, allow_pickle: bool = False) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return base64.b64encode(buf.getvalue()).decode()


def test_truncated_npz_at_every_offset_is_an_input_error(tmp_path):
    good = save_inputs([{"x": np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32), "n": np.arange(7)}],
                       tmp_path / "good.npz")
    data = good.read_bytes()
    assert set(load_inputs(good)[0]) == {"x", "n"}
    offsets = sorted(set(range(0, len(data), max(1, len(data) // 150))) | {len(data) - 1, len(data) - 22})
    for n in offsets:
        cut = tmp_path / "cut.npz"
        cut.write_bytes(data[:n])
        with pytest.raises(InputError, match="cut.npz"):
            load_inputs(cut)


@pytest.mark.parametrize("doc, message", [
    ([], "holds no samples"),
    ({}, "sample 0 is empty"),
    ([1, 2], "sample 0 is int"),
    ([{"x": 3}], "entry 'x' is not a Polygraphy-encoded array"),
    ([{"x": {"array": "!!not base64!!"}}], "'array' is not valid base64"),
    ([{"x": {"array": base64.b64encode(b"plain text, not an array").decode()}}], "not a .npy array"),
    ([{"x": {"array": _npy_b64(np.array([1, "a", None], dtype=object), allow_pickle=True)}}], "Object arrays cannot be loaded"),
    ([{"x": {"array": _npy_b64(np.ones(64))[:40]}}], "not a plain .npy array"),
])
def test_bad_polygraphy_json_is_an_input_error(tmp_path, doc, message):
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message):
        load_inputs(path)


def test_other_bad_files_are_input_errors(tmp_path):
    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(InputError, match="one bare .npy array"):
        load_inputs(bare)
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(InputError, match="holds no arrays"):
        load_inputs(empty)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable .npz"):
        load_inputs(objects)
    with pytest.raises(InputError, match="is a folder"):
        load_inputs(tmp_path)


def test_nan_inputs_are_warned_about_once(vit_path, caplog):
    graph = ModelGraph.load(vit_path)
    name = graph.input_names[0]
    info = graph.tensors[name]
    feeds = {name: np.full([d if isinstance(d, int) else 1 for d in info.shape], np.nan, np.float32)}
    with caplog.at_level(logging.WARNING, logger="aligner.inputs"):
        checked = validate_feeds(graph, feeds)
        validate_feeds(graph, checked)  # nested calls (search -> bisect) do not repeat it
    warnings = [r for r in caplog.records if "NaN or inf" in r.getMessage()]
    assert len(warnings) == 1 and f"Input {name!r}: all" in warnings[0].getMessage()


def test_written_files_get_the_umask_and_bad_paths_are_named(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a" / "plan.json", b"{}")
        save_inputs([{"x": np.ones(2, np.float32)}], tmp_path / "inputs.json")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "plan.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "inputs.json").stat().st_mode & 0o777 == 0o640
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "out.npz", tmp_path / "file" / "deeper" / "out.npz"):
        with pytest.raises(InputError, match=f"{tmp_path / 'file'} is a file, not a folder"):
            write_atomic(target, b"x")
    with pytest.raises(InputError, match="it is a folder"):
        write_atomic(tmp_path / "a", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "file", "inputs.json"]  # no temp files left behind


def test_saved_inputs_round_trip_whatever_the_names(tmp_path):
    sample = {"file": np.arange(3), "allow_pickle": np.ones((2, 2), np.float16)}  # numpy.savez's own keyword names
    back = load_inputs(save_inputs([sample], tmp_path / "odd.npz"))[0]
    assert set(back) == set(sample) and all(np.array_equal(back[k], v) for k, v in sample.items())
