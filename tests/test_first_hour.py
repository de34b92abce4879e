"""A new user's first hour on a real model: symbolic dims in bench and eval, bad external data,
a mistyped plan path, and output read at 80 columns (CI logs, pipes)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.cli.main import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _classifier(path, dims=("N", 3, "H", "W")):
    """Conv → ReLU → global pool → Gemm, with the given (symbolic) input dims."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="p2o.Conv2D.0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="p2o.BatchNormalization.1"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bench_times_a_symbolic_dims_model_with_input_shapes_or_inputs(capsys, tmp_path):
    model = _classifier(tmp_path / "det.onnx")
    code, out, err = _run(capsys, "bench", model, "--runs", "3", "--warmup", "1")
    assert code == 2 and "--input-shapes x:" in err  # the flag it names exists
    code, out, err = _run(capsys, "bench", model, "--input-shapes", "x:1x3x16x24", "--batch", "1,2", "--runs", "3", "--warmup", "1",
                          "--json", tmp_path / "b.json")
    assert code == 0, err
    import json

    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).random((3, 3, 12, 12), dtype=np.float32))
    code, out, err = _run(capsys, "bench", model, "--inputs", tmp_path / "in.npz", "--runs", "3", "--warmup", "1")
    assert code == 0 and "Traceback" not in err
    assert "│     3 │" in out  # the batch of the data given


def test_fixed_size_model_does_not_point_to_input_shapes(capsys, tmp_path):
    model = _classifier(tmp_path / "cls.onnx", dims=("N", 3, 16, 16))
    code, _, err = _run(capsys, "bench", model, "--runs", "3", "--warmup", "1")
    assert code == 0 and "override with --input-shapes" not in err


def test_eval_topk_on_a_symbolic_dims_classifier(capsys, tmp_path):
    from PIL import Image

    model = _classifier(tmp_path / "cls.onnx")
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(images / f"{i}.png")
    code, _, err = _run(capsys, "eval", "topk", model, "--images", images)
    assert code == 2 and "--input-shapes x:1x3xHxW" in err and "Traceback" not in err
    code, out, err = _run(capsys, "eval", "topk", model, "--images", images, "--input-shapes", "x:1x3x16x24")
    assert code == 0 and "on 4 images" in out, err
    np.savez(tmp_path / "in.npz", x=rng.random((6, 3, 16, 16), dtype=np.float32))
    code, out, err = _run(capsys, "eval", "topk", model, "--inputs", tmp_path / "in.npz")
    assert code == 0 and "on 6 images" in out, err


def _external_outside(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "ext").mkdir()
    np.ones((4, 4), np.float32).tofile(tmp_path / "ext" / "w.bin")
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../ext/w.bin"), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path = tmp_path / "m" / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("command", [["inspect"], ["compare"], ["bisect"], ["precision"], ["bench"], ["doctor", "--out", "{tmp}/d"],
                                     ["build", "-o", "{tmp}/b.onnx"]])
def test_external_data_outside_the_model_folder_is_named_with_the_fix(capsys, tmp_path, command):
    model = _external_outside(tmp_path)
    code, _, err = _run(capsys, command[0], model, *[a.format(tmp=tmp_path) for a in command[1:]])
    assert code == 2 and "Traceback" not in err
    assert "outside the model's folder" in err and "'../ext/w.bin'" in err and "Fix: move" in err


def test_missing_plan_file_says_not_found(capsys, tmp_path):
    model = _classifier(tmp_path / "cls.onnx", dims=(1, 3, 8, 8))
    code, _, err = _run(capsys, "compare", model, "--plan", tmp_path / "nope.json")
    assert code == 2 and "file not found" in err and "not a plan written" not in err


def _narrow(*argv):
    """The CLI as a CI log sees it: 80 columns, not a terminal."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-m", "aligner.cli.main", *map(str, argv)], capture_output=True, text=True, env=env)
    return done.returncode, done.stdout, done.stderr


def test_tables_at_80_columns_never_wrap_a_node_name(tmp_path):
    long_name = "/encoder/layers.11/self_attn/out_proj/ReduceMean_1"
    model = tmp_path / "ln.onnx"
    # a decomposed LayerNorm whose square overflows FP16 at the node with the long name
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], name="/encoder/layers.11/norm/ReduceMean", axes=[-1]),
             helper.make_node("Sub", ["x", "m"], ["d"], name="/encoder/layers.11/norm/Sub"),
             helper.make_node("Pow", ["d", "two"], ["p"], name="/encoder/layers.11/self_attn/out_proj/Pow"),
             helper.make_node("ReduceMean", ["p"], ["v"], name=long_name, axes=[-1]),
             helper.make_node("Sqrt", ["v"], ["s"], name="/encoder/layers.11/norm/Sqrt"),
             helper.make_node("Div", ["d", "s"], ["y"], name="/encoder/layers.11/norm/Div")]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
                              [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    np.savez(tmp_path / "in.npz", x=(np.random.default_rng(0).standard_normal((2, 16)) * 400).astype(np.float32))
    for argv in (["compare", model, "--inputs", tmp_path / "in.npz"], ["bisect", model, "--inputs", tmp_path / "in.npz"],
                 ["precision", model, "--inputs", tmp_path / "in.npz"]):
        code, out, err = _narrow(*argv)
        assert code in (0, 1) and "Traceback" not in err, err
        table = [line for line in out.splitlines() if line.startswith("│")]
        assert table and all(len(line) <= 80 for line in table)
        for line in table:  # a name cell holds a whole name or one elided in the middle, never a piece of a wrapped name
            cell = line.split("│")[1 if argv[0] != "compare" else 2].strip()
            if cell.startswith("/"):
                assert cell in {n.name for n in nodes} or "…" in cell, line
