"""ONNX's own odd models through inspect, compare and bisect: never a traceback.

A few of the models benchmarks/onnx_backend_sweep.py runs (all of ONNX's backend test data shipped
in the onnx wheel), chosen for what broke or could break: sequence-valued intermediates, string
inputs (an .npz holds them as unicode), a model ONNX Runtime cannot load (opset 6 BatchNormalization),
and an optional without a value (listed as not compared, with why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.cli.main import main

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _npz(model: Path, out: Path) -> Path:
    graph = onnx.load(str(model)).graph
    names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    feeds = {}
    for i, name in enumerate(names):
        t = onnx.TensorProto()
        t.ParseFromString((model.parent / "test_data_set_0" / f"input_{i}.pb").read_bytes())
        value = numpy_helper.to_array(t)
        feeds[name] = value.astype(str) if value.dtype == object else value
    np.savez(out, **feeds)
    return out


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, outcome", [
    ("simple/test_sequence_model1", (0, 1)),  # SequenceConstruct / SequenceInsert inside
    ("simple/test_strnorm_model_monday_casesensintive_upper", (0, 1, 3)),  # string input; ORT may lack the locale (exit 3)
    ("simple/test_strnorm_model_nostopwords_nochangecase", (0, 1)),  # string tensors compared by equality (was ValueError)
    ("pytorch-converted/test_BatchNorm2d_eval", (0, 1, 3)),  # opset 6: ONNX Runtime cannot load it here (exit 3)
])
def test_onnx_backend_models_end_in_a_verdict_or_a_clear_error(capsys, tmp_path, name, outcome):
    model = DATA / name / "model.onnx"
    assert model.exists(), f"the onnx wheel ({onnx.__version__}) no longer ships {name}: pick another backend test model"
    inputs = _npz(model, tmp_path / "in.npz")
    for command in ("inspect", "compare", "bisect"):
        extra = [] if command == "inspect" else ["--target", "emu:fp16", "--inputs", inputs]
        code, out, err = _run(capsys, command, model, *extra)
        assert code in (0, 1) + ((2, 3) if command != "inspect" else ()), (command, code, err)
        assert code in outcome or command == "inspect", (command, code, err)
        if code in (2, 3):
            assert "error:" in err or "FAILED" in out  # the one-line message, not a traceback


def test_an_optional_without_a_value_is_listed_as_not_compared(capsys, tmp_path):
    tp = helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Mul", ["x", "x"], ["m"], name="mul"),
             helper.make_node("Optional", [], ["o"], name="empty", type=tp),
             helper.make_node("OptionalHasElement", ["o"], ["has"], name="has"),
             helper.make_node("Cast", ["has"], ["hf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["m", "hf"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "optional", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "opt.onnx"))
    np.savez(tmp_path / "in.npz", x=np.arange(6, dtype=np.float32).reshape(2, 3))
    code, _, err = _run(capsys, "compare", tmp_path / "opt.onnx", "--inputs", tmp_path / "in.npz", "--json", tmp_path / "c.json")
    assert code == 0, err
    rows = {t["tensor"]: t for t in json.loads((tmp_path / "c.json").read_text())["tensors"]}
    assert not rows["o"]["diverges"] and rows["o"]["reason"] == "empty optional on both sides: not compared"
    code, _, err = _run(capsys, "bisect", tmp_path / "opt.onnx", "--inputs", tmp_path / "in.npz")
    assert code == 0 and "Traceback" not in err
