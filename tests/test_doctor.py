"""aligner doctor: the demo's pipeline on the user's own model, from the command line."""

from __future__ import annotations

import json

import numpy as np

from aligner.cli.main import main
from aligner.doctor import STEPS


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_doctor_finds_fixes_builds_and_reports_a_vit_fp16_overflow(capsys, tmp_path, vit_path, vit_inputs):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    out = tmp_path / "doc"
    code, stdout, err = _run(capsys, "doctor", vit_path, "--target", "emu:fp16", "--inputs", tmp_path / "in.npz", "--out", out,
                             "--bench-runs", "3")
    assert code == 0, err
    assert "Traceback" not in err
    for n, step in enumerate(STEPS, 1):
        assert f"[{n}/{len(STEPS)}] {step}" in err  # a progress line per step
    assert "re-run alone: aligner bisect" in err and "FIXED" in stdout
    doc = json.loads((out / "doctor.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert "/blocks.0/norm1/Pow" in steps["bisect"]["summary"]  # the culprit
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passed"] and any(p["node"].endswith("/Pow") for p in plan["fp32_nodes"])  # the decomposed LayerNorm's square
    assert steps["build"]["status"] == "passed" and (out / "model.fp16.onnx").exists()
    assert (out / "culprit" / "model.onnx").exists() and (out / "report.html").exists()
    html = (out / "report.html").read_text()
    assert "/blocks.0/norm1/Pow" in html
    # a step re-runs alone with the printed command, on the saved inputs
    command = steps["compare"]["command"].split()[1:]
    assert main(command) == 1 and "/blocks.0/norm1/Pow" in capsys.readouterr()[0]
    # never writes into a folder of files without --force
    code, _, err = _run(capsys, "doctor", vit_path, "--inputs", tmp_path / "in.npz", "--out", out)
    assert code == 2 and "--force" in err


def test_doctor_stops_at_the_step_whose_target_cannot_run(capsys, tmp_path, vit_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return  # this machine runs ort:cuda
    code, _, err = _run(capsys, "doctor", vit_path, "--target", "ort:cuda:fp16", "--input-shapes", "pixels:1x3x64x64",
                        "--out", tmp_path / "doc")
    assert code == 3 and "Traceback" not in err
    assert f"step 2/{len(STEPS)} (compare) could not run" in err and "CUDAExecutionProvider" in err
    assert "Re-run it alone with: aligner compare" in err
    assert (tmp_path / "doc" / "inspect.json").exists()  # the steps before it are kept


def test_doctor_on_an_int8_target_with_calibration(capsys, tmp_path, cnn_path):
    from aligner.graph.model import ModelGraph
    from aligner.inputs import make_inputs

    graph = ModelGraph.load(cnn_path)
    np.savez(tmp_path / "in.npz", **make_inputs(graph, seed=1))
    np.savez(tmp_path / "calib.npz", **make_inputs(graph, seed=2))
    out = tmp_path / "doc"
    code, stdout, err = _run(capsys, "doctor", cnn_path, "--target", "ort:cpu:int8", "--calib", tmp_path / "calib.npz",
                             "--inputs", tmp_path / "in.npz", "--out", out, "--bench-runs", "3")
    assert code in (0, 1) and "Traceback" not in err, err
    doc = json.loads((out / "doctor.json").read_text())
    assert doc["target"].startswith("ort:cpu:int8")
    assert [s["name"] for s in doc["steps"]] == list(STEPS)
    assert doc["steps"][STEPS.index("eval")]["status"] == "skipped"  # no task metric given
    assert (out / "report.html").exists()
