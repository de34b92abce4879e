"""aligner doctor with a task metric (a COCO dataset, as aligner eval coco takes it): the images
are the inputs, the eval step scores FP32 and the target side by side, and the printed command
re-runs it alone to the same numbers. The demo is this path on the built-in example (demo_run)."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np

from aligner.cli.main import main
from aligner.doctor import STEPS
from aligner.examples import shapes_detector_path, shapes_val


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_doctor_with_a_coco_dataset_feeds_its_images_and_evaluates_every_target(capsys, tmp_path):
    model = tmp_path / "det.onnx"
    shutil.copyfile(shapes_detector_path(), model)  # a user's detector: not the built-in path
    images, ann = shapes_val()
    out = tmp_path / "doc"
    code, stdout, err = _run(capsys, "doctor", model, "--data", images, "--ann", ann, "--adapter", "yolo", "--adapter-outputs",
                             "detections", "--limit", 12, "--batch", 6, "--max-ap-drop", 1.0, "--bench-runs", 0, "--out", out)
    assert code == 0 and "Traceback" not in err, err
    doc = json.loads((out / "doctor.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == list(STEPS)
    assert np.load(out / "inputs.npz")["pixels"].shape == (6, 3, 128, 128)  # the first batch of images, preprocessed
    assert steps["eval"]["status"] == "ok" and "on 12 images" in steps["eval"]["summary"]
    evaluation = json.loads((out / "eval.json").read_text())
    assert list(evaluation["targets"]) == ["ort:cpu:fp32", "emu:fp16"]
    assert steps["bench"]["status"] == "skipped"
    assert "COCO metrics" in (out / "report.html").read_text()  # the eval run is in the report
    # the eval step re-runs alone, from its printed command, to the same numbers
    (out / "eval.json").unlink()
    assert main(shlex.split(steps["eval"]["command"])[1:]) == 0
    capsys.readouterr()
    again = json.loads((out / "eval.json").read_text())
    for target, row in evaluation["targets"].items():
        assert again["targets"][target]["AP"] == row["AP"]


def test_doctor_refuses_half_a_dataset_with_the_fix(capsys, tmp_path):
    images, _ = shapes_val()
    code, _, err = _run(capsys, "doctor", shapes_detector_path(), "--data", images, "--out", tmp_path / "d")
    assert code == 2 and "--ann" in err and "Traceback" not in err
    code, _, err = _run(capsys, "doctor", shapes_detector_path(), "--data", images, "--ann", shapes_val()[1], "--out", tmp_path / "e")
    assert code == 2 and "--adapter" in err and "Traceback" not in err


class _Stop(Exception):
    pass


def test_an_ap_loss_beyond_the_allowed_drop_is_a_divergence_even_where_the_outputs_match(tmp_path):
    """The first 20 val images do not trip the stem LayerNorm's FP16 overflow (every tensor within
    tolerance), but COCO AP over 40 images drops by more than half a point: doctor goes on to bisect
    and precision instead of calling the target fine."""
    from aligner.doctor import example_coco
    from aligner.doctor import doctor
    from aligner.doctor.task import CocoEval
    from aligner.eval.dataset import CocoDataset

    example = example_coco(0.005, 20)
    task = CocoEval(CocoDataset(*shapes_val(), limit=40), example.adapter, example.preprocess, 0.005, None, 20, example.words)
    seen = {}

    def stop_after_compare(step, value):
        seen[step.name] = (step, value)
        if step.name == "compare":
            raise _Stop

    try:
        doctor(shapes_detector_path(), "emu:fp16", tmp_path / "doc", task=task, bench_runs=0, on_step=stop_after_compare)
    except _Stop:
        pass
    step, result = seen["compare"]
    assert result.first_divergent is None  # the outputs on the images fed match
    assert step.status == "diverged" and "emu:fp16 loses COCO AP" in step.summary and "allowed drop 0.005" in step.summary


def test_eval_coco_example_data_scores_a_copy_of_the_example_as_the_built_in_run_does(capsys, tmp_path):
    model = tmp_path / "copy.onnx"
    shutil.copyfile(shapes_detector_path(), model)
    code, _, err = _run(capsys, "eval", "coco", model)
    assert code == 2 and "--data IMAGE_DIR --ann INSTANCES.json" in err and "--example-data" in err
    code, _, err = _run(capsys, "eval", "coco", "--limit", 4, "--batch", 4, "--json", tmp_path / "builtin.json")
    assert code == 0, err
    code, _, err = _run(capsys, "eval", "coco", model, "--example-data", "--limit", 4, "--batch", 4, "--json", tmp_path / "copy.json")
    assert code == 0, err
    builtin, copy = (json.loads((tmp_path / f"{n}.json").read_text())["targets"] for n in ("builtin", "copy"))
    assert {t: r["AP"] for t, r in builtin.items()} == {t: r["AP"] for t, r in copy.items()}
    code, _, err = _run(capsys, "eval", "coco", model, "--example-data", "--data", tmp_path, "--ann", tmp_path / "x.json")
    assert code == 2 and "drop --data and --ann" in err


def test_precision_takes_the_task_metric_as_doctor_passes_it_and_refuses_a_second_acceptance(capsys, tmp_path):
    code, _, err = _run(capsys, "precision", shapes_detector_path(), "--example-data", "--accept-cmd", "true")
    assert code == 2 and "Give the acceptance once" in err and "Traceback" not in err
