"""Every command takes its inputs the same way (--inputs, --inputs-dir, --input-shapes, --calib), and
symbolic dims take their sizes from the data; bench reports a runtime that crashes while timing
(exit 3, the target named); the messages a new user acts on (resume, hints, the report's inputs)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from aligner.cli.main import build_parser, main
from aligner.examples import shapes_detector_path
from test_doctor_models import fpn_detector

COMMANDS = (("compare",), ("bisect",), ("precision",), ("eval", "topk"), ("bench",), ("build",), ("doctor",))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _options(*path: str) -> set[str]:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_the_same_input_arguments(command):
    assert {"--inputs", "--inputs-dir", "--input-shapes", "--calib"} <= _options(*command)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    onnx.save(fpn_detector(), str(root / "det.onnx"))
    (root / "samples").mkdir()
    for i in range(2):
        np.savez(root / "samples" / f"{i}.npz", x=np.random.default_rng(i).random((1, 3, 12, 20), dtype=np.float32))
    return root


def test_symbolic_dims_take_their_sizes_from_an_inputs_folder(capsys, tmp_path, detector):
    model, samples = detector / "det.onnx", detector / "samples"
    code, out, err = _run(capsys, "compare", model, "--inputs-dir", samples, "--json", tmp_path / "c.json")
    assert code == 1 and "runs the first" in err  # the BatchNormalization's FP16 fault, on the first of 2 samples
    assert json.loads((tmp_path / "c.json").read_text())["tensors"][0]["shape"] == [1, 8, 12, 20]
    code, out, err = _run(capsys, "bench", model, "--inputs-dir", samples, "--runs", "3", "--warmup", "1", "--json", tmp_path / "b.json")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["batch"] == 1
    code, out, err = _run(capsys, "build", model, "--target", "ort:cpu:fp16", "--fp32-nodes", "backbone/stem/BatchNormalization",
                          "--inputs-dir", samples, "-o", tmp_path / "m.onnx")
    assert code == 0 and "Traceback" not in err, err
    code, out, err = _run(capsys, "precision", model, "--inputs-dir", samples, "--out", tmp_path / "plan.json")
    assert code == 0 and json.loads((tmp_path / "plan.json").read_text())["verified"]["samples"] == 2


def test_input_arguments_that_contradict_each_other_are_refused_with_the_fix(capsys, tmp_path, detector):
    model, samples = detector / "det.onnx", detector / "samples"
    code, _, err = _run(capsys, "compare", model, "--inputs", samples / "0.npz", "--inputs-dir", samples)
    assert code == 2 and "give one of them" in err
    code, _, err = _run(capsys, "bisect", model, "--inputs", samples / "0.npz", "--input-shapes", "x:1x3x64x64")
    assert code == 2 and "x is 1x3x12x20" in err and "drop --input-shapes" in err
    code, _, err = _run(capsys, "bench", model, "--inputs-dir", tmp_path / "nope")
    assert code == 2 and "not found" in err
    # a symbolic-dims model without sizes: a concrete example built from the model's input
    code, _, err = _run(capsys, "compare", model)
    assert code == 2 and "--input-shapes x:1x3x640x640" in err and "xN" not in err


def test_bench_reports_a_runtime_that_crashes_while_timing(tmp_path):
    """ONNX Runtime's CPU provider segfaults on the built-in detector's FP16 graph (tests/test_sandbox.py);
    timing it used to kill the whole process (exit 139). Run in a child so a regression cannot kill pytest."""
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", "bench", str(shapes_detector_path()), "--target",
                           "ort:cpu:fp16", "--input-shapes", "pixels:1x3x128x128", "--runs", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "ort:cpu:fp16: ONNX Runtime crashed (signal SIGSEGV)" in proc.stderr and "timing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_compare_runs_on_other_inputs_differ_in_the_report(capsys, tmp_path, detector):
    model, samples = detector / "det.onnx", detector / "samples"
    runs = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        _run(capsys, "compare", model, "--inputs", samples / f"{i}.npz", "--run", run)
        runs.append(json.loads((run / "meta.json").read_text())["inputs"])
    assert [r["source"] for r in runs] == ["0.npz", "1.npz"] and runs[0]["sha256"] != runs[1]["sha256"]
    code, _, err = _run(capsys, "report", tmp_path / "run0", tmp_path / "run1", "-o", tmp_path / "r.html")
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert f"<code>0.npz</code> · content sha256 <code>{runs[0]['sha256']}</code>" in html
    assert f"<code>1.npz</code> · content sha256 <code>{runs[1]['sha256']}</code>" in html


def test_a_search_cut_short_says_how_to_resume_and_that_out_then_needs_force(capsys, tmp_path, detector):
    plan = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "precision", detector / "det.onnx", "--input-shapes", "x:1x3x16x16", "--max-trials", "1", "--out", plan)
    out = " ".join(out.split())
    assert code == 1 and "NOT VERIFIED" in out
    assert f"--resume {tmp_path / 'plan.trials.jsonl'}" in out and "--force" in out
    code, out, err = _run(capsys, "precision", detector / "det.onnx", "--input-shapes", "x:1x3x16x16", "--out", plan,
                          "--resume", tmp_path / "plan.trials.jsonl", "--max-trials", "20", "--force")
    assert code == 0, err  # the hint's command goes on
