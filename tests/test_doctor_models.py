"""aligner doctor on models a user brings: a detector with symbolic N x 3 x H x W and a known FP16
fault (sizes from --input-shapes), and an INT8 target with --calib and several samples (--inputs-dir);
and bisect --save-repro on INT8, whose piece must calibrate on its own inputs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.cli.main import main
from test_int8 import _image, build_cnn_int8

BN = "backbone/stem/BatchNormalization"


def fpn_detector() -> onnx.ModelProto:
    """A small FPN-style text detector with symbolic N x 3 x H x W: stem Conv -> BatchNormalization
    (channel 0: running variance 1e8, inf in FP16, so the channel becomes its bias) -> Relu ->
    stride-2 Conv -> Relu -> Resize x2 -> Concat with the stem -> head Conv -> Sigmoid."""
    rng = np.random.default_rng(0)
    c = 8
    mean, var, gamma, beta = np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(c, np.float32), np.zeros(c, np.float32)
    mean[0], var[0], gamma[0], beta[0] = 10.0, 1e8, 1e4, 5.0
    arrays = {"stem.w": rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32), "bn.scale": gamma, "bn.bias": beta, "bn.mean": mean,
              "bn.var": var, "down.w": rng.normal(0, 0.2, (c, c, 3, 3)).astype(np.float32),
              "head.w": rng.normal(0, 0.2, (1, 2 * c, 3, 3)).astype(np.float32), "up.scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "stem.w"], ["c1"], name="backbone/stem/Conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n1"], name=BN),
             helper.make_node("Relu", ["n1"], ["r1"], name="backbone/stem/Relu"),
             helper.make_node("Conv", ["r1", "down.w"], ["c2"], name="backbone/down/Conv", pads=[1] * 4, strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="backbone/down/Relu"),
             helper.make_node("Resize", ["r2", "", "up.scales"], ["u2"], name="neck/Resize", mode="nearest"),
             helper.make_node("Concat", ["r1", "u2"], ["cat"], name="neck/Concat", axis=1),
             helper.make_node("Conv", ["cat", "head.w"], ["logits"], name="head/Conv", pads=[1] * 4),
             helper.make_node("Sigmoid", ["logits"], ["maps"], name="head/Sigmoid")]
    graph = helper.make_graph(nodes, "fpn_detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                              initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("fpn") / "det.onnx"
    onnx.save(fpn_detector(), str(path))
    return path


def test_doctor_on_a_symbolic_dims_detector_names_the_batchnorm_plans_it_builds_and_reports(capsys, tmp_path, detector):
    out = tmp_path / "doc"
    code, stdout, err = _run(capsys, "doctor", detector, "--input-shapes", "x:1x3x32x48", "--out", out, "--bench-runs", "3")
    assert code == 0 and "Traceback" not in err, err
    steps = {s["name"]: s for s in json.loads((out / "doctor.json").read_text())["steps"]}
    assert steps["compare"]["status"] == "diverged"
    assert f"root cause {BN}" in steps["bisect"]["summary"] and "bn.var" in steps["bisect"]["summary"]  # the parameter named
    assert (out / "culprit" / "model.onnx").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passed"] and [p["node"] for p in plan["fp32_nodes"]] == [BN]  # that node and no other
    assert steps["build"]["status"] == "passed" and "checked on emu:fp16 against FP32: passed" in steps["build"]["summary"]
    assert (out / "model.fp16.onnx").exists()
    assert np.load(out / "inputs.npz")["x"].shape == (1, 3, 32, 48)  # the sizes given
    assert "FIXED" in stdout
    html = (out / "report.html").read_text()
    for section in ("Layer-by-layer compare: emu:fp16", "Bisect: emu:fp16", "Precision plan: emu:fp16", "Latency and throughput"):
        assert section in html
    assert BN in html and "x 1x3x32x48" in html  # the culprit, and which inputs each run used


@pytest.fixture(scope="module")
def outlier_cnn(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8doc")
    onnx.save(build_cnn_int8(outlier=True), str(root / "cnn.onnx"))
    (root / "calib").mkdir()
    (root / "samples").mkdir()
    for i in range(8):
        np.savez(root / "calib" / f"{i}.npz", **_image(100 + i))
    for i in range(3):
        np.savez(root / "samples" / f"{i}.npz", **_image(200 + i))
    return root


def test_doctor_on_int8_with_calibration_searches_on_every_sample_and_saves_a_repro(capsys, tmp_path, outlier_cnn):
    out = tmp_path / "doc"
    code, stdout, err = _run(capsys, "doctor", outlier_cnn / "cnn.onnx", "--target", "ort:cpu:int8", "--calib", outlier_cnn / "calib",
                             "--inputs-dir", outlier_cnn / "samples", "--out", out, "--bench-runs", "3")
    assert code == 0 and "Traceback" not in err, err
    assert "FIXED" in stdout
    steps = {s["name"]: s for s in json.loads((out / "doctor.json").read_text())["steps"]}
    assert steps["compare"]["status"] == "diverged"
    assert "on 3 samples" in err  # precision searched on every sample
    assert f"--inputs-dir {out / 'samples'}" in steps["precision"]["command"]
    assert f"--inputs {out / 'inputs.npz'}" in steps["compare"]["command"]  # compare and bisect: the first sample
    assert json.loads((out / "runs" / "precision" / "meta.json").read_text())["inputs"]["samples"] == 3
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passed"] and "conv2" in [p["node"] for p in plan["fp32_nodes"]]  # the outlier channel's Conv stays float
    assert "no repro saved" not in steps["bisect"]["summary"] and (out / "culprit" / "model.onnx").exists()
    assert steps["build"]["status"] == "passed" and (out / "model.int8.onnx").exists()
    assert "ort:cpu:int8" in steps["bench"]["summary"]
    # the printed precision command re-runs alone on all the samples
    assert main(shlex.split(steps["precision"]["command"])[1:]) == 0
    capsys.readouterr()


def test_bisect_save_repro_on_int8_calibrates_the_piece_on_its_own_inputs(capsys, tmp_path, outlier_cnn):
    repro = tmp_path / "repro"
    code, stdout, err = _run(capsys, "bisect", outlier_cnn / "cnn.onnx", "--target", "ort:cpu:int8", "--calib", outlier_cnn / "calib",
                             "--inputs", outlier_cnn / "samples" / "0.npz", "--save-repro", repro)
    assert code == 1 and "Traceback" not in err, err  # diverged; the repro no longer fails on the calibration's input names
    piece = onnx.load(str(repro / "model.onnx"))
    names = {i.name for i in piece.graph.input} - {t.name for t in piece.graph.initializer}
    calib = sorted((repro / "calib").glob("*.npz"))
    assert len(calib) == 8 and set(np.load(calib[0]).files) == names  # one per calibration sample, the piece's inputs
    readme = (repro / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if line.strip().startswith("aligner compare"))
    assert str(repro) in command and "absolute paths" in readme
    # the command works from any folder
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", *shlex.split(command)[1:]], cwd=os.path.expanduser("~") or "/",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
