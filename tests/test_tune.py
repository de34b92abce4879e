"""Fast deployable builds: runtime options tuned and recorded with each build; precision inversions caught.

Everything runs on ONNX Runtime CPU: the tuner's logic (candidate rejection, the choice, the
sidecar) is the same for the CUDA provider, whose candidates are only listed here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.cli.main import main

FAST = ["--tune-rounds", "2", "--tune-runs", "5"]
PINS = "/norm/Pow,/norm/ReduceMean_1,/norm/Add,/norm/Sqrt"  # tiny ViT's final LayerNorm overflows FP16 without these


def _matmul_softmax(d: int = 256, depth: int = 4) -> onnx.ModelProto:
    """MatMul + Softmax layers on [N, 64, d]: ORT CPU has no fast FP16 path for them on x86 (it casts)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * d**-0.5).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"/mm{i}"),
                  helper.make_node("Softmax", [f"m{i}"], [f"s{i}"], name=f"/softmax{i}", axis=-1)]
        x = f"s{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 64, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tuner_rejects_a_candidate_that_errors_and_one_that_fails_the_accuracy_check(vit_path, vit_inputs):
    from aligner import Target, Tolerance
    from aligner.graph.model import ModelGraph
    from aligner.tune import TuneSettings, tune

    # ORT's full optimizer fuses tiny ViT's decomposed LayerNorms (numbers move by ~2e-7); basic does not fuse them.
    exact = Tolerance("max_abs", 0.0, 0.0)
    result = tune(ModelGraph.load(vit_path), "ort:cpu:fp32", feeds=vit_inputs, tolerance=exact,
                  options=[{}, {"graph_optimization_level": "basic"}, {"intra_op_num_threads": "-1"}],
                  settings=TuneSettings(rounds=2, runs=3, warmup=1))
    by = {c.label: c for c in result.candidates}
    assert by["defaults"].status == "inaccurate" and "logits: max_abs" in by["defaults"].reason
    assert by["defaults"].median_ms is None  # rejected before timing
    assert by["intra_op_num_threads=-1"].status == "error" and "give a whole number >= 0" in by["intra_op_num_threads=-1"].reason
    ok = by["graph_optimization_level=basic"]
    assert ok.status == "ok" and ok.worst_rel_l2 == 0.0 and ok.median_ms > 0 and len(ok.rounds_ms) == 2
    assert ok.spread_ms == max(ok.rounds_ms) - min(ok.rounds_ms)
    assert result.chosen == (("graph_optimization_level", "basic"),)
    assert result.target == Target.parse("ort:cpu:fp32@graph_optimization_level=basic")
    assert "defaults were rejected (inaccurate)" in result.decision
    doc = result.to_dict()
    assert doc["chosen"] == {"graph_optimization_level": "basic"} and doc["tolerance"] == exact.to_dict()
    assert [c["status"] for c in doc["candidates"]] == ["inaccurate", "ok", "error"]


def test_candidate_sets_are_small_fix_the_users_options_and_offer_cuda_graphs_only_for_static_shapes(vit_path):
    from aligner import Target
    from aligner.graph.model import ModelGraph
    from aligner.tune import candidates

    vit = ModelGraph.load(vit_path)  # dynamic batch
    cuda = candidates(Target.parse("ort:cuda:fp16"), vit)
    assert cuda[0] == {} and {"cudnn_conv_algo_search": "HEURISTIC"} in cuda and {"prefer_nhwc": "1"} in cuda
    assert {"use_tf32": "1"} in cuda and not any("enable_cuda_graph" in c for c in cuda)
    assert all(len(c) <= 1 for c in cuda)  # one change at a time (the tuner adds the best combination)
    assert not any("use_tf32" in c for c in candidates(Target.parse("ort:cuda:fp32"), vit))  # TF32 is the tf32 target
    fixed = candidates(Target.parse("ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC"), vit)
    assert not any("cudnn_conv_algo_search" in c for c in fixed)
    static = vit.model
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    assert {"enable_cuda_graph": "1"} in candidates(Target.parse("ort:cuda:fp16"), ModelGraph(static))
    cpu = candidates(Target.parse("ort:cpu:fp32@intra_op_num_threads=1"), vit)
    assert {"graph_optimization_level": "basic"} in cpu and not any("intra_op_num_threads" in c for c in cpu)


def test_build_tune_writes_the_sidecar_and_bench_and_compare_run_the_build_with_its_options(vit_path, vit_inputs, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", **vit_inputs)
    out = tmp_path / "vit.fp16.onnx"
    build = ["build", str(vit_path), "--target", "ort:cpu:fp16@intra_op_num_threads=1", "--fp32-nodes", PINS,
             "--inputs", str(tmp_path / "in.npz"), "--tune", "-o", str(out)] + FAST
    assert main(build) == 0
    captured = capsys.readouterr()
    assert "tune: timing round 2/2" in captured.err and "runtime options tuned on ort:cpu:fp16" in captured.out
    sidecar = json.loads((tmp_path / "vit.fp16.onnx.json").read_text())
    tuning = sidecar["tuning"]
    assert tuning["fixed"] == {"intra_op_num_threads": "1"} and tuning["noise"] == 0.03 and tuning["rounds"] == 2
    labels = [c["label"] for c in tuning["candidates"]]
    assert labels[:3] == ["defaults", "graph_optimization_level=extended", "graph_optimization_level=basic"]
    assert not any("intra_op_num_threads" in c["options"] for c in tuning["candidates"])  # the user's option is fixed
    for c in tuning["candidates"]:
        assert c["status"] == "ok" and c["median_ms"] > 0 and c["spread_ms"] >= 0 and c["reason"].startswith("outputs rel_l2")
    shipped = {"intra_op_num_threads": "1", **tuning["chosen"]}
    assert sidecar["target"]["options"] == shipped and tuning["target"] == sidecar["target"]["spec"]
    assert main(build) == 2 and "--force" in capsys.readouterr().err  # never overwrites

    # bench given the build (or its sidecar) runs the target it was built for, with the shipped options
    spec = sidecar["target"]["spec"]
    assert main(["bench", str(out), "--runs", "2", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    assert f"target from vit.fp16.onnx.json: {spec}" in " ".join(capsys.readouterr().err.split())
    assert [r["target"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == [spec]
    assert main(["bench", str(out) + ".json", "--target", "ort:cpu:fp32@intra_op_num_threads=2,emu:fp16", "--runs", "2",
                 "--warmup", "0", "--json", str(tmp_path / "b2.json")]) == 2  # emu is not timed: the error names it
    assert "ONNX Runtime (ort:*)" in capsys.readouterr().err
    assert main(["bench", str(out) + ".json", "--target", "ort:cpu:fp32@intra_op_num_threads=2", "--runs", "2",
                 "--warmup", "0", "--json", str(tmp_path / "b2.json")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "options from vit.fp16.onnx.json" in err and "overridden on the command line: intra_op_num_threads" in err
    row = json.loads((tmp_path / "b2.json").read_text())["rows"][0]["target"]
    assert "intra_op_num_threads=2" in row and all(f"{k}={v}" in row for k, v in shipped.items() if k != "intra_op_num_threads")

    # compare given the sidecar debugs the build as built: its target, its options, the build's own graph
    assert main(["compare", str(out) + ".json", "--inputs", str(tmp_path / "in.npz"), "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["target"] == spec


def test_a_build_runs_as_built_not_rewritten_again(vit_path, vit_inputs, tmp_path):
    import onnxruntime as ort

    from aligner import Target, build, make_runner
    from aligner.build import read_sidecar
    from aligner.graph.model import ModelGraph

    out = tmp_path / "vit.fp16.onnx"
    build(vit_path, Target.parse("ort:cpu:fp16", pins=PINS.split(",")), out, check_inputs=vit_inputs)
    sidecar = read_sidecar(out)
    assert sidecar.model == out and sidecar.target.pins == tuple(PINS.split(",")) and read_sidecar(str(out) + ".json") == sidecar
    got = make_runner(ModelGraph.load(out), sidecar.target).run(vit_inputs)["logits"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert np.array_equal(got, session.run(["logits"], vit_inputs)[0])  # a second rewrite would un-pin the LayerNorm
    assert read_sidecar(vit_path) is None  # a model without a sidecar
    # a precision search on the build would change nothing (its precision is in the graph): refused, pointing at the original
    assert main(["precision", str(out), "--target", "ort:cpu:fp16"]) == 2


def test_bench_flags_a_precision_inversion_with_the_numbers_it_measured(tmp_path, capsys):
    from aligner.tune import NOISE

    path = tmp_path / "mlp.onnx"
    onnx.save(_matmul_softmax(), str(path))
    out = tmp_path / "bench.json"
    assert main(["bench", str(path), "--target", "ort:cpu:fp32,ort:cpu:fp16", "--batch", "1,8", "--runs", "10", "--warmup", "2",
                 "--json", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    doc = json.loads(out.read_text())
    median = {(r["target"], r["batch"]): r["latency_ms"]["median"] for r in doc["rows"]}
    expected = [b for b in (1, 8) if median["ort:cpu:fp16", b] > median["ort:cpu:fp32", b] * (1 + NOISE)]
    assert [i["batch"] for i in doc["inversions"]] == expected  # exactly the batches the measured rows invert
    for inv in doc["inversions"]:
        b = inv["batch"]
        assert (inv["lower"], inv["higher"]) == ("ort:cpu:fp16", "ort:cpu:fp32")
        assert (inv["lower_ms"], inv["higher_ms"]) == (median["ort:cpu:fp16", b], median["ort:cpu:fp32", b])
        assert f"warning: precision inversion at batch {b}: ort:cpu:fp16 takes {inv['lower_ms']:.3f} ms" in text
        assert f"ort:cpu:fp32 at {inv['higher_ms']:.3f} ms" in text and "--tune" in inv["advice"]


def test_inversion_advice_names_the_option_to_try_on_ort_cuda():
    from aligner import Target
    from aligner.bench import BenchRow, precision_inversions

    def row(spec: str, batch: int, ms: float) -> BenchRow:
        return BenchRow(spec, batch, {"median": ms, "p90": ms, "p99": ms, "mean": ms}, batch * 1e3 / ms, 100)

    # DETR-R50 480x640 on the H200 (issue 18): FP16 with the default cuDNN search is slower than TF32
    rows = [row("ort:cuda:fp32", 8, 24.14), row("ort:cuda:tf32", 8, 10.83), row("ort:cuda:fp16", 8, 20.75),
            row("ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC", 8, 8.32), row("ort:cuda:fp16", 1, 3.0), row("ort:cuda:tf32", 1, 2.95)]
    targets = {r.target: Target.parse(r.target) for r in rows}
    (inv,) = precision_inversions(rows, targets)  # batch 1: 3.0 vs 2.95 is within the noise band
    assert (inv.batch, inv.lower, inv.lower_ms, inv.higher, inv.higher_ms) == (8, "ort:cuda:fp16", 20.75, "ort:cuda:tf32", 10.83)
    assert "@cudnn_conv_algo_search=HEURISTIC" in inv.advice and "1.92x" in inv.message
    slow = [row("ort:cuda:tf32", 8, 10.83), row("ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC", 8, 12.0)]
    (inv,) = precision_inversions(slow, {r.target: Target.parse(r.target) for r in slow})
    assert "aligner build MODEL --target ort:cuda:fp16 --tune" in inv.advice and "HEURISTIC (" not in inv.advice


def _cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("argv, message", [
    (["--target", "ort:cpu:fp32@intra_op_num_threads=x", "--tune"], "intra_op_num_threads='x'; give a whole number >= 0"),
    (["--target", "ort:cpu:fp32@cudnn_conv_algo_search=HEURISTIC", "--tune"], "is a CUDA provider option"),
    pytest.param(["--target", "ort:cuda:fp16", "--tune"], "CUDAExecutionProvider",
                 marks=pytest.mark.skipif(_cuda_provider(), reason="tuning ort:cuda is no error where the CUDA provider exists")),
])
def test_bad_tuning_requests_are_clean_errors(vit_path, tmp_path, capsys, argv, message):
    assert main(["build", str(vit_path), "-o", str(tmp_path / "m.onnx")] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "m.onnx").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(vit_path), "-o", str(tmp_path / "m.onnx"), "--tune", "--tune-runs", "0"])
    assert exit_.value.code == 2 and "give a whole number >= 1" in capsys.readouterr().err


def test_a_json_that_is_not_a_sidecar_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "notes.json").write_text("{}")
    assert main(["bench", str(tmp_path / "notes.json")]) == 2
    assert "not a sidecar written by aligner build" in capsys.readouterr().err


def test_int8_slower_than_fp32_is_an_inversion_too():
    from aligner import Target
    from aligner.bench import BenchRow, precision_inversions

    def row(spec: str, ms: float) -> BenchRow:
        return BenchRow(spec, 1, {"median": ms, "p90": ms, "p99": ms, "mean": ms}, 1e3 / ms, None)

    # the example detector on this CPU (benchmarks/RESULTS.md, issue 17): full INT8 2.51 ms, FP32 1.81 ms
    rows = [row("ort:cpu:fp32", 1.81), row("ort:cpu:int8", 2.51)]
    (inv,) = precision_inversions(rows, {r.target: Target.parse(r.target) for r in rows})
    assert (inv.lower, inv.higher) == ("ort:cpu:int8", "ort:cpu:fp32") and "INT8 does not pay" in inv.advice
