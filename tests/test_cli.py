"""The command line: verdicts, exit codes, output files, and bad input without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from aligner.cli.main import main
from aligner.examples import tiny_vit


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_finds_overflow_and_writes_json_csv(capsys, vit_path, vit_inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    js, csv = tmp_path / "diff.json", tmp_path / "diff.csv"
    code, out, _ = _run(capsys, "compare", vit_path, "--target", "emu:fp16", "--inputs", tmp_path / "in.npz", "--json", js, "--csv", csv)
    assert code == 1
    assert "/blocks.0/norm1/Pow" in out and "DIVERGED" in out
    doc = json.loads(js.read_text())
    assert doc["summary"]["first_divergent"]["node"] == "/blocks.0/norm1/Pow"
    row = doc["tensors"][0]
    assert {"tensor", "node", "op_type", "index", "shape", "dtype", "metrics", "nonfinite", "diverges"} <= set(row)
    assert {"max_abs", "mean_abs", "rel_l2", "mvre", "cosine", "snr_db"} <= set(row["metrics"])
    assert doc["reference"] == "ort:cpu:fp32" and doc["target"] == "emu:fp16"
    assert "/blocks.0/norm1/Pow" in csv.read_text()
    code, _, err = _run(capsys, "compare", vit_path, "--inputs", tmp_path / "in.npz", "--json", js)
    assert code == 2 and "--force" in err  # never overwrite without asking


def test_compare_same_model_exits_zero(capsys, vit_path):
    code, out, _ = _run(capsys, "compare", vit_path, "--target-model", vit_path, "--input-shapes", "pixels:1x3x64x64")
    assert code == 0 and "No divergence" in out


def test_inspect_lists_fp16_risks(capsys, vit_path):
    code, out, _ = _run(capsys, "inspect", vit_path)
    assert code == 0
    assert "opset 16" in out and "ReduceMean" in out and "/blocks.0/norm1/Pow" in out


def test_demo_runs_and_refuses_foreign_folder(capsys, tmp_path, demo_run):
    code, out, folder = demo_run
    assert code == 0 and "/stem_norm/Pow" in out and (folder / "compare.json").exists()
    assert "emu:fp16+plan" in out and (folder / "report.html").exists()
    # the demo is doctor on the built-in detector, with its val split as the task metric
    steps = {s["name"]: s for s in json.loads((folder / "doctor.json").read_text())["steps"]}
    assert "root cause /stem_norm/Pow" in steps["bisect"]["summary"] and "--strategy all" in steps["bisect"]["command"]
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["passed"] and any("COCO AP drop <= 0.005" in a for a in plan["accept"])
    assert "--example-data --batch 50 --max-ap-drop 0.005" in steps["precision"]["command"]  # re-runs with the same acceptance
    assert {p["node"] for p in plan["fp32_nodes"]} >= {"/stem_norm/Pow"}
    assert steps["build"]["status"] == "passed" and (folder / "model.fp16.onnx").exists()
    evaluation = json.loads((folder / "eval.json").read_text())["targets"]
    assert list(evaluation) == ["ort:cpu:fp32", "emu:fp16", "emu:fp16+plan"]
    assert evaluation["emu:fp16+plan"]["AP"] >= evaluation["ort:cpu:fp32"]["AP"] - 0.005 > evaluation["emu:fp16"]["AP"]
    for shown in ("first 6 of", "probes", "kept in FP32", "COCO metrics on 200 images", "what aligner found"):
        assert shown in out  # each step's result printed in full
    from test_cli_narrow import _wrapped_names

    width = int(os.environ.get("COLUMNS", 80))  # the console's width when stdout is not a terminal
    assert all(len(line) <= width for line in out.splitlines())  # the eval table is no longer cut off
    names = [n.name for n in onnx.load(str(folder / "shapes_detector.onnx")).graph.node]
    assert _wrapped_names(out, names) == []
    html = (folder / "report.html").read_text()
    for section in ("Layer-by-layer compare: emu:fp16", "Bisect: emu:fp16", "Precision plan: emu:fp16", "COCO metrics"):
        assert section in html
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("do not touch")
    code, _, err = _run(capsys, "demo", "--out", foreign)
    assert code == 2 and "not made by aligner demo" in err


def test_polygraphy_saved_inputs_are_read(capsys, vit_path, vit_inputs, tmp_path):
    from polygraphy.json import save_json

    save_json([vit_inputs], str(tmp_path / "inputs.json"))
    saved = tmp_path / "again.npz"
    code, _, _ = _run(capsys, "compare", vit_path, "--inputs", tmp_path / "inputs.json", "--save-inputs", saved)
    assert code == 1
    with np.load(saved, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["pixels"], vit_inputs["pixels"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "{vit}", "--target", "trt:fp8"], "Valid targets: ort:cpu:fp32"),
        (["compare", "{vit}", "--input-shapes", "pixels:1x3x32x32"], "expected shape batchx3x64x64, given 1x3x32x32"),
        (["compare", "{vit}", "--input-shapes", "pixel:1x3x64x64"], "Did you mean: 'pixels'"),
        (["compare", "{vit}", "--tensors", "/blocks.0/norm1/Pow_outptu_0"], "Did you mean: '/blocks.0/norm1/Pow_output_0'"),
        (["compare", "{vit}", "--fp32-nodes", "/blocks.0/norm1/Pw"], "Did you mean: '/blocks.0/norm1/Pow'"),
        (["compare", "{tmp}/missing.onnx"], "not found"),
        (["inspect", "{tmp}/text.onnx"], "not an ONNX file"),
        (["inspect", "{tmp}/cut.onnx"], "truncated"),
        (["inspect", "{tmp}/invalid.onnx"], "ONNX checker"),
    ],
)
def test_bad_input_is_a_message_and_exit_2(argv, message, vit_path, tmp_path):
    (tmp_path / "text.onnx").write_text("hello " * 100)
    data = vit_path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    bad = tiny_vit()
    bad.graph.node[3].input[0] = "ghost"
    onnx.save(bad, str(tmp_path / "invalid.onnx"))
    argv = [a.format(vit=vit_path, tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bisect_cli_verdict_json_and_repro(capsys, vit_path, vit_inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    js = tmp_path / "verdict.json"
    code, out, _ = _run(capsys, "bisect", vit_path, "--inputs", tmp_path / "in.npz", "--strategy", "frontier",
                        "--json", js, "--save-repro", tmp_path / "culprit")
    assert code == 1 and "DIVERGED" in out and "nonfinite" in out
    doc = json.loads(js.read_text())
    assert {"first_divergent", "root_cause", "nonfinite_origin", "strategy", "target_runs", "probes", "repro"} <= set(doc)
    assert {"tensor", "node", "op_type", "metrics"} <= set(doc["first_divergent"])
    assert doc["root_cause"]["node"] == "/blocks.0/norm1/Pow" and doc["root_cause"]["kind"] == "nonfinite"
    assert {"node", "op_type", "kind", "local_error", "reason"} <= set(doc["root_cause"])
    assert doc["target_runs"] == len(doc["probes"]) and doc["strategy"] == "frontier"
    assert doc["repro"]["reproduces"] is True
    # the repro's own command, run as printed, shows the overflow again
    command = doc["repro"]["command"].split()[1:]
    code, out, _ = _run(capsys, *command)
    assert code == 1 and "/blocks.0/norm1/Pow" in out


def test_bisect_cli_exit_codes(capsys, vit_path, tmp_path):
    code, out, _ = _run(capsys, "bisect", vit_path, "--target-model", vit_path)  # same graph: nothing to find
    assert code == 0 and "No divergence" in out
    code, out, _ = _run(capsys, "bisect", vit_path, "--target", "ort:cpu:bf16")  # ORT CPU lacks BF16 kernels
    assert code == 3 and "FAILED" in out
    code, _, err = _run(capsys, "bisect", vit_path, "--target", "ort:gpu:fp16")
    assert code == 2 and "ort:cuda:fp16" in err


def test_precision_cli_plan_model_and_resume(capsys, vit_path, vit_inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    plan, mixed = tmp_path / "plan.json", tmp_path / "mixed.onnx"
    code, out, _ = _run(capsys, "precision", vit_path, "--inputs", tmp_path / "in.npz", "--out", plan, "--save-model", mixed)
    assert code == 0 and "PASSED" in out
    doc = json.loads(plan.read_text())
    assert {"precision", "target", "fp32_nodes", "passed", "trials", "accept", "final", "fp16_flop_fraction"} <= set(doc)
    assert doc["passed"] and doc["fp32_nodes"] and {"node", "op_type", "reason"} <= set(doc["fp32_nodes"][0])
    assert "--layerPrecisions=" in doc["tensorrt_legacy"]["trtexec"]
    pins = [p["node"] for p in doc["fp32_nodes"]]
    assert sum(doc["op_types"].values()) == len(pins)
    # the saved mixed model is real FP16 with those nodes in FP32, and it loads
    model = onnx.load(str(mixed))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # resuming from the log re-runs nothing and finds the same plan
    log = tmp_path / "plan.trials.jsonl"
    code, out, _ = _run(capsys, "precision", vit_path, "--inputs", tmp_path / "in.npz", "--out", plan, "--resume", log, "--force")
    assert code == 0 and f"{json.loads(plan.read_text())['trials']} trial(s)" in out and "0 new" in out
    assert [p["node"] for p in json.loads(plan.read_text())["fp32_nodes"]] == pins


def test_precision_cli_no_plan_and_bad_accept(capsys, vit_path, vit_inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    code, out, _ = _run(capsys, "precision", vit_path, "--inputs", tmp_path / "in.npz", "--accept-cmd", "false", "--max-trials", "3")
    assert code == 1 and "NO PASSING PLAN" in out and "No plan exists" in out
    code, _, err = _run(capsys, "precision", vit_path, "--accept", "rel_l2 below 3")
    assert code == 2 and "METRIC<=VALUE" in err
    code, _, err = _run(capsys, "precision", vit_path, "--accept", "max_abs<0")
    assert code == 2 and "write max_abs<=0" in err


def test_build_with_plan_and_target_options_keeps_both(tmp_path):
    """--plan with a target that carries @options: the plan's nodes stay FP32 and the options are kept
    (before: '+plan' went after the options and broke the spec or, with a '+' in an option value, was dropped)."""
    import json
    from pathlib import Path

    from aligner.cli.main import main
    from aligner.examples import shapes_detector_path

    plan = Path(__file__).resolve().parents[1] / "datasets" / "shapes_detector.plan.json"
    out = tmp_path / "m.onnx"
    assert main(["build", str(shapes_detector_path()), "--target", "ort:cpu:fp16@intra_op_num_threads=1", "--plan", str(plan),
                 "-o", str(out)]) == 0
    target = json.loads((tmp_path / "m.onnx.json").read_text())["target"]
    assert target["options"] == {"intra_op_num_threads": "1"}
    assert target["fp32_nodes"] == [p["node"] for p in json.loads(plan.read_text())["fp32_nodes"]]
