"""Plans replay what was verified, or refuse (issue 27).

The model is test_int8's outlier-channel CNN (conv2's channel 0 x1000, compensated in conv3): full
INT8 fails, a plan keeps the outlier site in float. Its twin has the same architecture and the same
generic node names (conv0..conv4) with other weights — the PP-OCR detector/recognizer case, where a
plan searched on one is accepted on the other because the names match.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_int8 import _image, build_cnn_int8

from aligner.backends import make_runner
from aligner.backends.replay import verification
from aligner.backends.target import Target
from aligner.cli.main import main
from aligner.errors import PlanError
from aligner.graph.fingerprint import model_digest
from aligner.graph.model import ModelGraph
from aligner.quant import runner as int8_runner
from aligner.search.precision import search_precision


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """One INT8 search through the CLI: its plan, the QDQ model it saved, the data it used."""
    root = tmp_path_factory.mktemp("replay")
    (root / "calib").mkdir()
    for i in range(8):
        np.savez(root / "calib" / f"{i}.npz", **_image(100 + i))
    np.savez(root / "held_out.npz", **_image(7))
    np.savez(root / "fresh.npz", **_image(9))
    onnx.save(build_cnn_int8(True), str(root / "model.onnx"))
    onnx.save(build_cnn_int8(True, seed=1), str(root / "twin.onnx"))  # same node names, other weights
    plan, saved = root / "plan.json", root / "model.int8.onnx"
    code = main(["precision", str(root / "model.onnx"), "--target", "ort:cpu:int8", "--calib", str(root / "calib"), "--no-sweep",
                 "--inputs", str(root / "held_out.npz"), "--out", str(plan), "--save-model", str(saved)])
    assert code == 0
    return {"root": root, "plan": plan, "saved": saved, "doc": json.loads(plan.read_text())}


@pytest.fixture
def ran(monkeypatch) -> list:
    """The content hash of every QDQ model an INT8 runner runs in this test."""
    shas, init = [], int8_runner.Int8Runner.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        shas.append(self.model_sha)

    monkeypatch.setattr(int8_runner.Int8Runner, "__init__", spy)
    return shas


def test_the_plan_records_what_it_was_verified_with(searched):
    doc, root = searched["doc"], searched["root"]
    verified = doc["verified"]
    assert verified["model_sha"] == model_digest(onnx.load(str(root / "model.onnx"))) and verified["samples"] == 1
    assert verified["nodes"] == 9 and verified["inputs"] == {"x": [1, 3, 16, 16]}
    calibration = doc["quantization"]["calibration"]
    assert calibration["path"] == str((root / "calib").resolve()) and calibration["files"] == 8 and calibration["files_sha"]
    assert doc["quantization"]["settings"]["calibrate"] == "minmax" and doc["accept"]
    resaved = root / "resaved.onnx"  # the hash is the content's: saving the model again (external data too) keeps it
    onnx.save(onnx.load(str(root / "model.onnx")), str(resaved), save_as_external_data=True, size_threshold=0)
    assert model_digest(ModelGraph.load(resaved).model) == verified["model_sha"]


def test_int8_plan_replays_the_verified_qdq_model_in_compare_eval_bench_and_build(searched, ran, capsys):
    root, plan = searched["root"], searched["plan"]
    verified = model_digest(onnx.load(str(searched["saved"])))  # what the search verified and saved
    target = f"ort:cpu:int8+{plan}"
    # no --calib: the plan's calibration data, not the command's --inputs (fresh.npz), which it used to calibrate on
    assert main(["compare", str(root / "model.onnx"), "--target", target, "--inputs", str(root / "fresh.npz")]) == 0
    assert main(["eval", "topk", str(root / "model.onnx"), "--targets", f"ort:cpu:fp32,{target}", "--inputs", str(root / "fresh.npz")]) == 0
    assert main(["bench", str(root / "model.onnx"), "--target", target, "--runs", "2", "--warmup", "1"]) == 0
    assert ran == [verified] * 3
    built = root / "built.int8.onnx"
    assert main(["build", str(root / "model.onnx"), "--target", target, "--calib", str(root / "calib"), "-o", str(built)]) == 0
    assert model_digest(onnx.load(str(built))) == verified  # the build's stamp is metadata: the same QDQ model
    assert "Traceback" not in capsys.readouterr().err


def test_a_plan_applied_to_another_model_is_refused(searched, capsys):
    root, plan = searched["root"], searched["plan"]
    for command in (["compare", str(root / "twin.onnx"), "--target", f"ort:cpu:int8+{plan}"],
                    ["bench", str(root / "twin.onnx"), "--target", f"ort:cpu:int8+{plan}", "--runs", "1"]):
        assert main(command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"Plan {plan} was verified on another model" in err and searched["doc"]["verified"]["model_sha"] in err
        assert "node name(s) exist here, which proves nothing" in err
        assert f"aligner precision {root / 'twin.onnx'} --target ort:cpu:int8 --out plan.json" in err and "Traceback" not in err


def test_changed_or_missing_calibration_is_refused(searched, tmp_path, capsys):
    root = searched["root"]
    calib = tmp_path / "calib"
    shutil.copytree(root / "calib", calib)
    doc = json.loads(json.dumps(searched["doc"]))
    doc["quantization"]["calibration"]["path"] = str(calib)  # the same data, moved: still the plan's
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(doc))
    model = str(root / "model.onnx")

    def compare(*extra) -> tuple[int, str]:
        code = main(["compare", model, "--target", f"ort:cpu:int8+{plan}", "--inputs", str(root / "fresh.npz"), *extra])
        return code, " ".join(capsys.readouterr().err.split())

    assert compare()[0] == 0
    assert compare("--calib", str(root / "calib"))[0] == 0  # other files, same content: the verified data
    np.savez(calib / "3.npz", **_image(999))
    code, err = compare()
    assert code == 2 and f"verified calibrating on {calib}" in err and "now holds other data" in err and "--calib" in err
    code, err = compare("--calib", str(root / "fresh.npz"))
    assert code == 2 and "the calibration given" in err and "fresh.npz, is other data" in err and "Drop --calib" in err
    shutil.rmtree(calib)
    code, err = compare()
    assert code == 2 and f"verified calibrating on {calib}" in err and "which no longer exists" in err and "Traceback" not in err


def test_quantizer_settings_that_contradict_the_plan_are_refused(searched):
    plan = searched["plan"]
    with pytest.raises(PlanError, match=r"verified with calibrate=minmax; this target sets calibrate=entropy"):
        Target.parse(f"ort:cpu:int8+{plan}@calibrate=entropy")
    assert Target.parse(f"ort:cpu:int8+{plan}@calibrate=minmax").option_dict["calibrate"] == "minmax"  # the plan's own: fine


def test_fp16_plans_refuse_other_models_and_old_plans_load_with_a_warning(searched, tmp_path, caplog):
    root = searched["root"]
    graph, twin = ModelGraph.load(root / "model.onnx"), ModelGraph.load(root / "twin.onnx")
    samples = [_image(7)]
    found = search_precision(graph, "emu:fp16", samples=samples)
    assert found.verified == verification(graph, samples)  # the search records what it verified, FP16 as INT8
    plan = tmp_path / "fp16.json"
    plan.write_text(json.dumps(found.to_dict()))
    target = Target.parse(f"emu:fp16+{plan}")
    with caplog.at_level(logging.WARNING, logger="aligner"):
        make_runner(graph, target)
    assert "verified on 1 sample(s); its acceptance may not hold on other inputs" in caplog.text
    with pytest.raises(PlanError, match="verified on another model"):
        make_runner(twin, target)
    old = tmp_path / "old.json"  # written before plans recorded their model: loads, cannot be checked, says so
    old.write_text(json.dumps({k: v for k, v in found.to_dict().items() if k != "verified"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligner"):
        make_runner(twin, Target.parse(f"emu:fp16+{old}"))
    assert f"Plan {old} records no model hash" in caplog.text and "cannot be checked" in caplog.text


def test_an_fp16_build_of_another_model_with_the_plan_is_refused(searched, tmp_path, capsys):
    root = searched["root"]
    plan = tmp_path / "fp16.json"
    assert main(["precision", str(root / "model.onnx"), "--target", "emu:fp16", "--out", str(plan)]) in (0, 1)
    code = main(["build", str(root / "twin.onnx"), "--target", "ort:cuda:fp16", "--plan", str(plan), "--out", str(tmp_path / "twin.fp16.onnx")])
    assert code == 2 and "verified on another model" in capsys.readouterr().err
    assert not (tmp_path / "twin.fp16.onnx").exists()


def test_precision_warns_when_its_plan_rests_on_few_samples(tmp_path, capsys):
    from aligner.examples.fused_faults import conv_bn_net

    onnx.save(conv_bn_net(layers=3, channels=8, size=16), tmp_path / "m.onnx")
    assert main(["precision", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "verified on 1 input sample(s)" in " ".join(out.split()) and "--inputs-dir" in out
    assert json.loads((tmp_path / "plan.json").read_text())["verified"]["samples"] == 1


def test_few_samples_is_not_said_of_a_plan_judged_by_a_task_metric_on_its_own_data():
    import math

    from aligner.backends.replay import judged_on_own_data
    from aligner.search.precision import Acceptance

    assert not judged_on_own_data(Acceptance(threshold=0.1).clauses())  # tensors on the samples: few samples matter
    per_output = Acceptance(threshold=0.1, outputs=(("logits", Acceptance(metric="cosine", threshold=0.99)),))
    assert not judged_on_own_data(per_output.clauses())
    coco = Acceptance(threshold=math.inf, task=lambda runner: "", task_name="COCO AP drop <= 0.005 (reference AP 0.8304)")
    assert judged_on_own_data(coco.clauses())  # 200 images of its own: "verified on 1 sample" would mislead
    assert judged_on_own_data(Acceptance(threshold=0.1, command="./check.sh {model}").clauses())
