"""INT8 targets: ONNX Runtime's QDQ quantization, matched through Q/DQ pairs, searched for float nodes.

The fault: one conv layer whose activations have an outlier channel (its weights and bias scaled
by 1000; the next conv reads that channel with weights divided by 1000, so the float model's
function is unchanged). Per-tensor activation quantization of that tensor spends its 256 levels
on the outlier and zeroes the other channels: the error appears where the tensor is quantized for
its consumer, and keeping the outlier conv and/or that consumer in float is the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import make_runner, reference_runner
from aligner.backends.target import Target
from aligner.cli.main import main
from aligner.compare.layerwise import compare
from aligner.compare.metrics import rel_l2
from aligner.compare.tolerance import tolerance_for
from aligner.errors import InputError, TargetError
from aligner.graph.model import ModelGraph
from aligner.quant.quantize import QuantSettings, quantize, vnni_missing
from aligner.search.bisect import bisect
from aligner.search.isolate import kernel_or_quantization
from aligner.search.precision import search_precision
from aligner.search.verdict import LocalError

OUTLIER_CONV, CONSUMER = "conv2", "conv3"  # conv2 -> relu2 -> conv3


def build_cnn_int8(outlier: bool, seed: int = 0, channels: int = 8) -> onnx.ModelProto:
    """Conv+Relu x4, then a Conv head; ``outlier``: conv2's output channel 0 is x1000 (compensated in conv3)."""
    rng = np.random.default_rng(seed)
    shapes = [(3, channels), (channels, channels), (channels, channels), (channels, channels), (channels, 4)]
    ws = [rng.normal(0, (2 / (ci * 9)) ** 0.5, (co, ci, 3, 3)).astype(np.float32) for ci, co in shapes]
    bs = [rng.normal(0, 0.1, co).astype(np.float32) for _, co in shapes]
    if outlier:
        ws[2][0] *= 1000
        bs[2][0] = abs(bs[2][0]) * 1000 + 500
        ws[3][:, 0] /= 1000
    nodes, inits, x = [], [], "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(b, f"conv{i}.b")]
        last = i == len(ws) - 1
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], ["y" if last else f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        if not last:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(nodes, "cnn_int8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _image(seed: int) -> dict:
    return {"x": np.random.default_rng(seed).normal(size=(1, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("int8")
    calib = root / "calib"
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i}.npz", **_image(100 + i))
    held_out = root / "held_out.npz"
    np.savez(held_out, **_image(7))
    paths = {"root": root, "calib": calib, "inputs": held_out}
    for name, outlier in (("fault", True), ("clean", False)):
        paths[name] = root / f"{name}.onnx"
        onnx.save(build_cnn_int8(outlier), str(paths[name]))
    return paths


def _target(spec: str, models: dict) -> Target:
    return Target.parse(spec).with_options({"calib": str(models["calib"])})


def test_int8_targets_parse_with_quantizer_settings_and_float_pins():
    target = Target.parse("ort:cpu:int8+fp32=conv2@calibrate=entropy,reduce_range=1")
    assert target.is_quantized and target.pins == ("conv2",)
    assert Target.parse(str(target)) == target
    settings = QuantSettings.of(target)
    assert (settings.calibrate, settings.reduce_range, settings.types, settings.per_channel) == ("entropy", True, "u8s8", True)
    assert Target.parse("emu:int8").base == "emu:int8"
    with pytest.raises(TargetError, match="minmax, entropy, percentile"):
        QuantSettings.of(Target.parse("ort:cpu:int8@calibrate=kl"))


def test_compare_on_int8_lists_the_original_tensors_dequantized(models):
    graph = ModelGraph.load(models["clean"])
    result = compare(graph, target=_target("ort:cpu:int8", models), feeds=_image(7))
    listed = [d.tensor for d in result.tensors]
    assert listed == ["a0", "a1", "a2", "a3", "y"]  # original names, not *_DequantizeLinear_Output
    assert set(result.unmatched) == {"c0", "c1", "c2", "c3"}  # pre-Relu: the quantizer folds each Relu into its Conv's output Q/DQ
    assert result.first_divergent is None and all(0 < d.metrics["rel_l2"] < 0.05 for d in result.tensors)
    assert not any(d.perturbed for d in result.tensors)  # capturing the integer tensors left ORT's fused kernels as deployed


def test_emu_and_ort_int8_run_the_same_qdq_model(models):
    graph = ModelGraph.load(models["clean"])
    # the same settings: on a CPU without VNNI ort:cpu:int8 defaults to 7-bit weights (its u8s8 kernels saturate otherwise)
    real, emulated = (make_runner(graph, _target(t, models)) for t in ("ort:cpu:int8", f"emu:int8@reduce_range={int(vnni_missing())}"))
    assert real.quantized.model.SerializeToString() == emulated.quantized.model.SerializeToString()
    ops = {n.op_type for n in real._runner.optimized_model().graph.node}
    assert "QLinearConv" in ops  # integer kernels on ort:cpu:int8; emu:int8 keeps Q/DQ in float
    assert not emulated._runner.optimize
    a, b = real.run(_image(7))["y"], emulated.run(_image(7))["y"]
    reference = reference_runner(graph).run(_image(7))["y"]
    assert rel_l2(a, b) < 0.02 and 0 < rel_l2(reference, b) < 0.05


def test_bisect_every_strategy_and_isolate_name_the_quantized_consumer(models):
    graph = ModelGraph.load(models["fault"])
    target = _target("ort:cpu:int8", models)
    for strategy in ("all", "frontier", "isolate"):
        verdict = bisect(graph, target=target, feeds=_image(7), strategy=strategy)
        assert verdict.first_divergent.tensor == "a3", strategy  # conv3's output (its Relu folded in): the first tensor that departs
        assert verdict.root_cause.kind == "local" and verdict.root_cause.node in ("relu3", CONSUMER)
        own = {e.node: e for e in verdict.local_errors}
        assert own[CONSUMER].diverges and own[CONSUMER].metrics["rel_l2"] > 0.5
        assert not own[OUTLIER_CONV].diverges  # its own output, dominated by the outlier channel, quantizes fine
        others = [e.node for e in verdict.local_errors if e.diverges and e.node not in ("relu3", CONSUMER)]
        assert others == [], strategy
    assert own[CONSUMER].metrics["emulated_rel_l2"] > 0.5  # the same in float Q/DQ: quantization's error, not the kernel's
    assert kernel_or_quantization(own[CONSUMER], tolerance_for(target)) == "quantization"


def test_kernel_error_is_told_apart_from_quantization_error():
    tol = tolerance_for(Target.parse("ort:cpu:int8"))
    kernel = LocalError("n", "Conv", 0, "t", {"rel_l2": 0.4, "max_abs": 3.0, "emulated_rel_l2": 0.01}, True, False)
    quant = LocalError("n", "Conv", 0, "t", {"rel_l2": 0.4, "max_abs": 3.0, "emulated_rel_l2": 0.3}, True, False)
    assert kernel_or_quantization(kernel, tol) == "kernel" and kernel_or_quantization(quant, tol) == "quantization"


def test_plan_keeps_only_the_outlier_site_in_float(models):
    graph = ModelGraph.load(models["fault"])
    target = _target("ort:cpu:int8", models)
    samples = [_image(7), _image(8)]
    plan = search_precision(graph, target, samples=samples)
    assert plan.passed and plan.precision == "int8"
    assert set(plan.fp32_nodes) <= {OUTLIER_CONV, "relu2", CONSUMER} and CONSUMER in plan.fp32_nodes
    assert set(plan.seeds) == {CONSUMER, "relu3"}  # from the isolated errors (conv3's Relu is folded into its unit)
    assert plan.quantization["settings"]["calibrate"] == "minmax" and plan.quantization["calibration"]["samples"] == 8
    for pin in plan.fp32_nodes:  # 1-minimal, proven on the real kernels: each one removed fails
        without = quantize(graph, target, exclude=[p for p in plan.fp32_nodes if p != pin])
        runner = make_runner(graph, target.with_pins([p for p in plan.fp32_nodes if p != pin]))
        assert without.excluded == runner.quantized.excluded
        assert rel_l2(reference_runner(graph).run(samples[0])["y"], runner.run(samples[0])["y"]) > 0.05
    clean = search_precision(ModelGraph.load(models["clean"]), _target("ort:cpu:int8", models), samples=samples)
    assert clean.passed and clean.fp32_nodes == [] and clean.trials == 1


def test_cli_precision_int8_saves_the_model_and_plan_that_compare_reuses(models, capsys):
    root = models["root"]
    plan, saved = root / "plan.json", root / "fault.int8.onnx"
    code = main(["precision", str(models["fault"]), "--target", "ort:cpu:int8@reduce_range=1", "--calib", str(models["calib"]), "--no-sweep",
                 "--inputs", str(models["inputs"]), "--out", str(plan), "--save-model", str(saved), "--force"])
    assert code == 0
    doc = json.loads(plan.read_text())
    kept = [p["node"] for p in doc["fp32_nodes"]]
    assert CONSUMER in kept and doc["quantization"]["settings"]["types"] == "u8s8"
    replayed = Target.parse(f"ort:cpu:int8+{plan}")  # quantizes as the plan was verified
    assert replayed.pins == tuple(kept) and QuantSettings.of(replayed).reduce_range
    model = onnx.load(str(saved))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    consumer = next(n for n in model.graph.node if n.name == CONSUMER)
    assert consumer.input[1] == f"{CONSUMER}.w"  # kept in float: reads its float weights
    assert main(["compare", str(models["fault"]), "--target", f"ort:cpu:int8+{plan}", "--calib", str(models["calib"]),
                 "--inputs", str(models["inputs"])]) == 0
    assert main(["compare", str(models["fault"]), "--target", "ort:cpu:int8", "--calib", str(models["calib"]),
                 "--inputs", str(models["inputs"])]) == 1


def test_cli_int8_errors_are_clean(models, capsys):
    missing = models["root"] / "no_such_calib"
    assert main(["compare", str(models["clean"]), "--target", "ort:cpu:int8", "--calib", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no_such_calib: no such file or folder" in err and "Traceback" not in err
    empty = models["root"] / "empty"
    empty.mkdir(exist_ok=True)
    assert main(["precision", str(models["clean"]), "--target", "ort:cpu:int8", "--calib", str(empty)]) == 2
    assert "holds no .npz files" in capsys.readouterr().err
    assert main(["compare", str(models["clean"]), "--target", "ort:cpu:int8@reduce_range=2", "--calib", str(models["calib"])]) == 2
    assert "reduce_range='2'; choose one of 0, 1" in capsys.readouterr().err
    bad = models["root"] / "bad.npz"
    np.savez(bad, wrong=np.zeros(3, np.float32))
    with pytest.raises(InputError):
        quantize(ModelGraph.load(models["clean"]), Target.parse(f"ort:cpu:int8@calib={bad}"))


def test_sweep_picks_the_setting_with_the_smallest_full_int8_error(models):
    from aligner.quant.sweep import sweep_settings

    graph = ModelGraph.load(models["clean"])
    target = _target("ort:cpu:int8", models)
    candidates = [QuantSettings("minmax", "u8s8", False, False), QuantSettings("minmax", "u8s8", False, True)]
    best, points = sweep_settings(graph, target, [_image(7)], candidates=candidates)
    assert len(points) == 2 and all(p.value > 0 for p in points)
    winner = min(points, key=lambda p: p.value)
    assert QuantSettings.of(best) == winner.settings and best.option_dict["calib"] == str(models["calib"])


def test_switchable_qdq_emulates_any_exclusion_without_the_quantizer(models):
    """One QDQ model with a switch on every activation Q/DQ pair gives, for a set of nodes kept in
    float, what ONNX Runtime's quantizer would make of that exclusion (Q/DQ in float), and ranks the
    tensors by their own share of the output error: the outlier tensor first."""
    from aligner.quant.switch import SwitchableQdq
    from aligner.search.int8 import quantizable

    graph = ModelGraph.load(models["fault"])
    emulated = _target("emu:int8", models)
    universe = quantizable(graph, emulated)
    assert "relu2" in universe  # folded into conv2's output Q/DQ, it reappears when conv2 is kept in float
    switch = SwitchableQdq(graph, quantize(graph, emulated).model, universe)
    assert switch.adjacent["a2"] == {OUTLIER_CONV, "relu2", CONSUMER}  # a2 stays float only when all three do
    assert switch.float_tensors([CONSUMER]) == {"conv3.w", "conv3.b"}  # conv3 alone in float: conv2 still quantizes a2
    reference = reference_runner(graph).run(_image(7))["y"]
    assert rel_l2(reference, switch.runner(universe).run(_image(7))["y"]) < 1e-6  # every switch off: the float model
    for excluded in ([], [CONSUMER], sorted(switch.adjacent["a2"]), ["conv0", "conv1"]):
        quantized = make_runner(graph, emulated.with_pins(excluded)).run(_image(7))["y"]
        assert rel_l2(quantized, switch.runner(excluded).run(_image(7))["y"]) < 1e-6, excluded
    share, read = switch.sensitivity([_image(7), _image(8)])
    assert read == 2  # both samples, stacked into one batch (the model's batch dimension is fixed: one run each)
    ranked = sorted(share, key=share.get, reverse=True)
    # the outlier tensor, then conv3's weights (its compensating column, /1000, rounds to 0 per output channel); the rest is noise
    assert ranked[:2] == ["a2", "conv3.w"] and share["a2"] > 0.5 and max(share[t] for t in ranked[2:]) < 0.01


def test_fallback_search_is_one_minimal_on_a_landscape_that_is_not_monotone():
    """Keeping tensor h float makes the output worse unless x is float too (quantization errors that
    cancel): the ranked prefix passes with h and x inside, and the node-by-node pass removes both."""
    from aligner.search.int8 import FallbackGroup, search_fallback
    from aligner.search.pins import Trial

    needed = {"a", "b", "c"}
    calls = []

    def check(pins: frozenset, phase: str) -> Trial:
        calls.append(pins)
        return Trial(pins, needed <= pins and ("h" not in pins or "x" in pins), phase)

    groups = [FallbackGroup(frozenset({"h"}), "th", 0.9), FallbackGroup(frozenset({"a", "b"}), "t1", 0.5)]
    groups += [FallbackGroup(frozenset({f"n{i}"}), f"t{i + 2}", 0.1) for i in range(20)]
    groups += [FallbackGroup(frozenset({"x", "c"}), "tx", 0.05), FallbackGroup(frozenset({"y"}), "ty", 0.01)]
    pins, verified = search_fallback(groups, check)
    assert sorted(pins) == ["a", "b", "c"] and verified.passed
    for pin in pins:  # 1-minimal: without any one kept node the check fails
        assert not check(frozenset(pins) - {pin}, "proof").passed
    trials = len(set(calls[:-3]))
    assert trials <= 1 + 2 * 5 + 2 * 25  # pure, doubling+halving over 24 groups, at most two rounds over the prefix
    assert search_fallback(groups, lambda p, phase: Trial(p, True, phase)) == ([], Trial(frozenset(), True, "pure"))


def test_reduce_range_defaults_to_what_this_cpus_integer_kernels_need(models):
    """ONNX Runtime's u8s8 kernels saturate on x86 CPUs without VNNI (int16 pair sums): there ort:cpu:int8
    defaults to 7-bit weights, and its real kernels then compute what the emulated QDQ model does."""
    assert QuantSettings.of(Target.parse("ort:cpu:int8")).reduce_range == vnni_missing()
    assert not QuantSettings.of(Target.parse("ort:cpu:int8@types=u8u8")).reduce_range  # u8u8 does not saturate
    assert not QuantSettings.of(Target.parse("emu:int8")).reduce_range  # GPU paths: no such kernels
    assert not QuantSettings.of(Target.parse("ort:cpu:int8@reduce_range=0")).reduce_range  # the user's word wins
    graph = ModelGraph.load(models["clean"])
    real = make_runner(graph, _target("ort:cpu:int8", models)).run(_image(7))["y"]
    emulated = make_runner(graph, _target(f"emu:int8@reduce_range={int(vnni_missing())}", models)).run(_image(7))["y"]
    assert rel_l2(real, emulated) < 1e-3
