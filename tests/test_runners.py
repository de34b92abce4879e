"""One Runner protocol for every runtime: the same calls give the same answers on every target this
machine can run, runtime options reach the runtime and are recorded, and the same mistake gets the
same error everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligner.backends import Runner, check_target, make_runner, reference_runner
from aligner.backends.target import Target
from aligner.compare.layerwise import diff_tensor
from aligner.compare.tolerance import tolerance_for
from aligner.errors import InputError, TargetError, TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs

torch = pytest.importorskip("torch")

# Every target a CPU machine runs; ort:cpu:bf16 parses but ONNX Runtime's CPU provider has no
# BF16 compute kernels (test_ort_cpu_bf16_says_which_kernel_is_missing).
CPU_TARGETS = ["ort:cpu:fp32", "ort:cpu:fp16", "emu:fp16", "emu:bf16", "torch:cpu:fp32", "ov:cpu:fp32"]  # ov: the openvino extra (dev)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The tests' ResNet-style CNN, its ONNX export (dynamic batch) and a batch of two images."""
    from aligner.examples.testmodels import build_cnn, export_onnx

    torch.manual_seed(0)
    module = build_cnn().eval()
    path = export_onnx(module, (torch.randn(1, 3, 32, 32),), tmp_path_factory.mktemp("runners") / "cnn.onnx", False,
                       input_names=["pixels"], output_names=["logits"],
                       dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    graph = ModelGraph.load(path)
    return module, graph, make_inputs(graph, {"pixels": (2, 3, 32, 32)})


def _runner(cnn, spec: str) -> Runner:
    module, graph, _ = cnn
    return make_runner(graph, spec, module=module if spec.startswith("torch") else None)


def _layer3(graph: ModelGraph, target: Target) -> str:
    """The output of the CNN's last residual block, as each runtime names it."""
    return "layer3" if target.runtime == "torch" else [n for n in graph.nodes if n.name.startswith("/layer3/")][-1].output[0]


@pytest.mark.parametrize("spec", CPU_TARGETS)
def test_every_runner_answers_the_same_calls_like_the_reference(cnn, spec):
    _, graph, feeds = cnn
    reference, runner = reference_runner(graph), _runner(cnn, spec)
    assert isinstance(runner, Runner) and runner.target == Target.parse(spec)
    assert [i.to_dict() for i in runner.describe_inputs()] == [{"name": "pixels", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    tol = tolerance_for(runner.target)  # the one tolerance policy: fp32 tight, fp16/bf16 by their rounding
    expected = reference.run(feeds)
    got = runner.run(feeds)
    assert list(got) == ["logits"] and got["logits"].shape == (2, 10)
    assert not diff_tensor(expected["logits"], got["logits"], tol).diverges
    if runner.target.precision == "fp32":
        assert np.allclose(got["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    inner = _layer3(graph, runner.target)
    captured = runner.run(feeds, [inner, "logits", "pixels"])
    assert list(captured) == [inner, "logits", "pixels"] and captured["pixels"] is feeds["pixels"]
    ref_inner = reference.run(feeds, [_layer3(graph, reference.target)])[_layer3(graph, reference.target)]
    assert captured[inner].shape == ref_inner.shape == (2, 16, 32, 32)
    assert not diff_tensor(ref_inner, captured[inner], tol).diverges
    assert np.array_equal(captured["logits"], got["logits"])  # capturing did not change the outputs
    assert runner.run(feeds, ["pixels"])["pixels"] is feeds["pixels"]  # only inputs asked for (a repro's piece fed by them)
    times = runner.time(feeds, runs=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_the_same_mistake_gets_the_same_error_in_every_backend(cnn):
    for spec in CPU_TARGETS:
        with pytest.raises(InputError, match=r"Unknown tensor 'logit'.*Did you mean: 'logits'"):
            _runner(cnn, spec).run(cnn[2], ["logit"])


def test_a_torch_target_needs_its_module_and_keeps_no_pins(cnn):
    _, graph, _ = cnn
    with pytest.raises(TargetError, match=r"pass the module.*module=model.*--torch MODULE:FUNCTION"):
        make_runner(graph, "torch:cpu:fp32")
    with pytest.raises(TargetError, match="only for torch"):
        make_runner(graph, "ort:cpu:fp32", module=cnn[0])


def test_ort_cpu_bf16_says_which_kernel_is_missing(cnn):
    with pytest.raises(TargetRunError, match=r"ort:cpu:bf16: ONNX Runtime could not build the model: .*Could not find an implementation"):
        _runner(cnn, "ort:cpu:bf16").run(cnn[2])


@pytest.mark.parametrize("spec, message", [
    ("ort:cpu:fp32@intra_op_threads=1", r"unknown runtime option 'intra_op_threads'\. Did you mean: intra_op_num_threads"),
    ("ort:cpu:fp16@cudnn_conv_algo_search=HEURISTIC", r"is a CUDA provider option: it applies to ort:cuda:\* targets"),
    ("emu:fp16@graph_optimization_level=all", r"not for the emulator.*Options of emu:fp16: intra_op_num_threads"),
    ("ort:cpu:fp32@graph_optimization_level=fast", r"graph_optimization_level='fast'; choose one of disable_all, basic, extended, all"),
    ("ort:cpu:fp32@intra_op_num_threads=many", r"intra_op_num_threads='many'; give a whole number"),
    ("torch:cpu:fp32@benchmark=1", r"Options of torch:cpu:fp32: cudnn_benchmark, channels_last"),
])
def test_an_unknown_or_bad_option_errors_clearly(cnn, spec, message):
    with pytest.raises(TargetError, match=message):
        _runner(cnn, spec)


def test_trt_options_are_checked_without_tensorrt():
    with pytest.raises(TargetError, match=r"unknown runtime option 'workspace'\. Did you mean: workspace_mb"):
        check_target("trt:fp16@workspace=1024")
    assert check_target("trt:fp16@builder_optimization_level=5").option_dict == {"builder_optimization_level": "5"}


def test_runtime_options_reach_the_session_and_an_explicit_one_wins():
    from aligner.backends.ort.runner import cuda_provider_options, make_session
    from aligner.examples import tiny_vit

    fast = make_session(tiny_vit(), Target.parse("ort:cpu:fp32@intra_op_num_threads=1,graph_optimization_level=basic"))
    options = fast.get_session_options()
    assert options.intra_op_num_threads == 1 and options.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    reference = make_session(tiny_vit(), Target.parse("ort:cpu:fp32"), optimize=False).get_session_options()
    assert reference.graph_optimization_level.name == "ORT_DISABLE_ALL"  # the reference's fidelity default
    # CUDA provider options (built here, run on the device): the precision's TF32 default, unless given
    assert cuda_provider_options(Target.parse("ort:cuda:tf32"))["use_tf32"] == "1"
    assert cuda_provider_options(Target.parse("ort:cuda:fp16"))["use_tf32"] == "0"
    chosen = cuda_provider_options(Target.parse("ort:cuda:tf32@use_tf32=0,cudnn_conv_algo_search=HEURISTIC,intra_op_num_threads=2"))
    assert chosen == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}  # session options stay out


def test_bench_rows_name_the_target_with_its_options(cnn, tmp_path, capsys):
    from aligner.bench import bench
    from aligner.cli.main import main

    _, graph, _ = cnn
    result = bench(graph, ["ort:cpu:fp32", "ort:cpu:fp32@intra_op_num_threads=1"], [1, 2], runs=2, warmup=0)
    assert [(r.target, r.batch) for r in result.rows] == [("ort:cpu:fp32", 1), ("ort:cpu:fp32", 2),
                                                           ("ort:cpu:fp32@intra_op_num_threads=1", 1),
                                                           ("ort:cpu:fp32@intra_op_num_threads=1", 2)]
    out = tmp_path / "bench.json"
    assert main(["bench", str(graph.path), "--target", "ort:cpu:fp16@intra_op_num_threads=1,execution_mode=sequential,ort:cpu:fp32",
                 "--runs", "2", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["target"] for r in rows] == ["ort:cpu:fp16@execution_mode=sequential,intra_op_num_threads=1", "ort:cpu:fp32"]
    capsys.readouterr()
    from io import StringIO

    from rich.console import Console

    from aligner.cli.bench import print_bench

    table = StringIO()
    print_bench(result, Console(file=table, width=200))
    assert "ort:cpu:fp32@intra_op_num_threads=1" in table.getvalue()  # the table shows the options each row ran with
    assert main(["bench", str(graph.path), "--target", "ort:cpu:fp32@threads=1"]) == 2
    assert "unknown runtime option 'threads'" in capsys.readouterr().err


def test_bench_times_pytorch_through_its_runner(cnn):
    from aligner.bench import bench

    module, graph, _ = cnn
    result = bench(graph, ["torch:cpu:fp32@channels_last=1"], [2], runs=2, warmup=1, torch_module=module)
    assert [(r.target, r.batch) for r in result.rows] == [("torch:cpu:fp32@channels_last=1", 2)] and result.rows[0].throughput > 0


@pytest.mark.parametrize("spec", [
    "ort:cuda:fp16+fp32=/a/Pow,/a/Sqrt@cudnn_conv_algo_search=HEURISTIC,use_tf32=0",
    "emu:bf16+fp32=/a/Pow@intra_op_num_threads=2",
    "torch:cuda:autocast@cudnn_benchmark=1",
    "trt:fp16@builder_optimization_level=5,workspace_mb=512",
])
def test_targets_with_pins_and_options_round_trip_through_str(spec):
    target = Target.parse(spec)
    assert Target.parse(str(target)) == target and target.options


def test_a_target_with_a_plan_and_options_round_trips_and_the_runner_keeps_it(cnn, tmp_path):
    _, graph, feeds = cnn
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"fp32_nodes": [{"node": "/layer3/Add"}, {"node": "/layer3/Relu_1"}]}))
    by_file = Target.parse(f"emu:fp16+{plan}@intra_op_num_threads=1")
    by_flag = Target.parse("emu:fp16+plan", plan=plan, options={"intra_op_num_threads": "1"})
    assert by_file == by_flag and str(by_flag) == f"emu:fp16+{plan}@intra_op_num_threads=1"
    assert Target.parse(str(by_flag)) == by_flag and by_flag.pins == ("/layer3/Add", "/layer3/Relu_1")
    runner = make_runner(graph, by_flag)
    assert runner.target == by_flag and runner.run(feeds)["logits"].shape == (2, 10)
