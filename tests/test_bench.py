"""aligner bench on the CPU: the JSON the issue asks for, fixed-batch models, the report's chart."""

from __future__ import annotations

import json

import pytest

from aligner.cli.main import main
from aligner.examples import shapes_detector_path


def test_bench_json_rows_and_report(tmp_path, capsys):
    out, page = tmp_path / "bench.json", tmp_path / "bench.html"
    code = main(["bench", str(shapes_detector_path()), "--target", "ort:cpu:fp32", "--batch", "1,2", "--runs", "5",
                 "--warmup", "1", "--json", str(out), "--report", str(page)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["device"] and [r["batch"] for r in doc["rows"]] == [1, 2]
    for row in doc["rows"]:
        assert row["target"] == "ort:cpu:fp32" and row["throughput"] > 0
        assert row["latency_ms"]["median"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
    html = page.read_text()
    assert "Latency and throughput" in html and html.count("<svg") >= 1
    assert "items/s" in capsys.readouterr().out


def test_bench_respects_a_fixed_batch_and_names_bad_targets(vit_path, tmp_path, capsys):
    import onnx

    from aligner.examples import tiny_vit

    model = tiny_vit()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed at 1
    path = tmp_path / "vit1.onnx"
    onnx.save(model, str(path))
    assert main(["bench", str(path), "--batch", "1,4", "--runs", "3", "--warmup", "0"]) == 0
    assert "fixed at 1" in capsys.readouterr().out
    assert main(["bench", str(path), "--target", "emu:fp16"]) == 2
    assert "ONNX Runtime (ort:*)" in capsys.readouterr().err


def test_bench_times_pytorch_eager_side_by_side(tmp_path, capsys, monkeypatch):
    import torch

    from conftest import _export, build_cnn

    path = _export(build_cnn(), (torch.randn(1, 3, 32, 32),), tmp_path / "cnn.onnx", dynamo=False)
    (tmp_path / "factories.py").write_text("from conftest import build_cnn as cnn\n")  # the tests' CNN builder
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "b.json"
    assert main(["bench", str(path), "--target", "ort:cpu:fp32,torch:cpu:fp32", "--torch", "factories:cnn",
                 "--runs", "3", "--warmup", "1", "--json", str(out)]) == 0
    assert [r["target"] for r in json.loads(out.read_text())["rows"]] == ["ort:cpu:fp32", "torch:cpu:fp32"]
    assert main(["bench", str(path), "--target", "torch:cpu:fp32"]) == 2
    assert "--torch MODULE:FUNCTION" in capsys.readouterr().err


def test_plan_targets_are_named_with_their_plan_file(vit_path, vit_inputs, tmp_path, capsys):
    from aligner.bench import bench
    from aligner.errors import InputError
    from aligner.search.precision import search_precision

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(search_precision(vit_path, "emu:fp16", samples=[vit_inputs]).to_dict()))
    result = bench(vit_path, ["ort:cpu:fp16", "ort:cpu:fp16+plan"], [1], plan=plan, runs=2, warmup=0)
    assert [r.target for r in result.rows] == ["ort:cpu:fp16", f"ort:cpu:fp16+{plan}"]
    with pytest.raises(InputError, match="no plan was given"):
        bench(vit_path, ["ort:cpu:fp16+plan"], [1], runs=2, warmup=0)
    assert main(["bench", str(vit_path), "--target", "ort:cpu:fp16+plan", "--plan", str(plan), "--runs", "2", "--warmup", "0"]) == 0
    assert main(["bench", str(vit_path), "--target", "trt:fp99"]) == 2 and "Valid targets" in capsys.readouterr().err
