"""INT8 builds and the other INT8 runtimes: ``aligner build --target ort:cpu:int8|ort:cuda:int8|trt:int8``.

The model is the outlier-channel CNN of test_int8 (conv2's channel 0 x1000, compensated in conv3):
full INT8 fails the check, the plan's float nodes pass it, and the built QDQ model then runs as
built in every command (its sidecar names the target; nothing is quantized twice).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_int8 import CONSUMER, OUTLIER_CONV, _image, build_cnn_int8

from aligner.backends import check_target, make_runner
from aligner.backends.target import Target
from aligner.build import build
from aligner.cli.main import main
from aligner.compare.metrics import rel_l2
from aligner.errors import InputError, TargetError
from aligner.graph.model import ModelGraph
from aligner.graph.precision import built_precision
from aligner.quant.quantize import QuantSettings, quantize, vnni_missing


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8_build")
    (root / "calib").mkdir()
    for i in range(8):
        np.savez(root / "calib" / f"{i}.npz", **_image(100 + i))
    np.savez(root / "held_out.npz", **_image(7))
    onnx.save(build_cnn_int8(True), str(root / "fault.onnx"))
    plan = {"fp32_nodes": [{"node": OUTLIER_CONV}, {"node": CONSUMER}], "accept": ["outputs finite", "rel_l2<=0.05"],
            "quantization": {"settings": {"calibrate": "minmax", "types": "u8s8", "reduce_range": vnni_missing(), "per_channel": True}}}
    (root / "plan.json").write_text(json.dumps(plan))
    return root


def _cli(work, *args) -> int:
    return main(["build", str(work / "fault.onnx"), "--calib", str(work / "calib"), "--inputs", str(work / "held_out.npz"), *args])


def test_full_int8_build_is_refused_and_says_how_to_find_the_float_nodes(work, capsys):
    out = work / "full.int8.onnx"
    assert _cli(work, "--target", "ort:cpu:int8", "-o", str(out)) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "not written" in said and "aligner" in said and "precision" in said and "rel_l2 <= 0.05 (or max_abs <= 0.01)" in said
    assert not out.exists()


def test_int8_build_with_a_plan_writes_the_qdq_model_that_runs_as_built(work, capsys):
    out = work / "plan.int8.onnx"
    assert _cli(work, "--target", "ort:cpu:int8", "--plan", str(work / "plan.json"), "-o", str(out)) == 0
    assert "2 node(s) kept in float" in " ".join(capsys.readouterr().out.split())
    built = onnx.load(str(out))
    assert built_precision(built) == "int8"
    float_weights = {n.name for n in built.graph.node if n.op_type == "Conv" and n.input[1] == f"{n.name}.w"}
    assert float_weights == {OUTLIER_CONV, CONSUMER}  # the plan's convs kept float weights; the others read DQ(int8 weights)
    sidecar = json.loads((work / "plan.int8.onnx.json").read_text())
    assert sidecar["quantization"]["excluded"] == sorted([OUTLIER_CONV, CONSUMER])
    assert sidecar["check"]["passed"] and sidecar["check"]["on"] == "ort:cpu:int8" and sidecar["check"]["worst_rel_l2"] < 0.05
    # The built model with its sidecar's target runs as built: the same outputs as the float model quantized the same way.
    target = Target.parse("ort:cpu:int8", pins=[OUTLIER_CONV, CONSUMER]).with_options({"calib": str(work / "calib"), "reduce_range": str(int(vnni_missing()))})
    again = make_runner(ModelGraph.load(work / "fault.onnx"), target).run(_image(7))["y"]
    as_built = make_runner(ModelGraph.load(out), Target.parse(sidecar["target"]["spec"])).run(_image(7))["y"]
    assert rel_l2(again, as_built) < 1e-6
    assert main(["bench", str(out), "--runs", "3", "--warmup", "1"]) == 0


def test_trt_int8_quantizes_signed_and_symmetric(work):
    target = Target.parse("trt:int8").with_options({"calib": str(work / "calib")})
    check_target(target)
    assert QuantSettings.of(target).types == "s8s8" and QuantSettings.of(target).symmetric
    qdq = quantize(ModelGraph.load(work / "fault.onnx"), target).model
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    zero_points = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # what TensorRT takes
    dequantized = {inits[n.input[0]].dtype for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert dequantized == {np.dtype(np.int8)}  # weights only: biases stay float (TensorRT rejects int32 DQ)
    with pytest.raises(TargetError, match="signed, symmetric INT8 with float biases"):
        QuantSettings.of(Target.parse("trt:int8@types=u8s8"))


def test_gpu_int8_builds_are_checked_with_qdq_in_float_on_this_machine(work):
    out = work / "cuda.int8.onnx"
    plan = str(work / "plan.json")
    result = build(ModelGraph.load(work / "fault.onnx"), Target.parse("ort:cuda:int8+plan", plan=plan).with_options({"calib": str(work / "calib")}),
                   out, plan=plan, check_inputs=_image(7))
    assert result.written and result.check.on == "emu:int8" and result.check.passed
    assert built_precision(onnx.load(str(out))) == "int8"


def test_fp16_fallback_puts_only_the_float_nodes_in_fp16(work):
    graph = ModelGraph.load(work / "fault.onnx")
    pins = f"+fp32={OUTLIER_CONV},{CONSUMER}"
    mixed = Target.parse(f"ort:cuda:int8{pins}@fallback=fp16").with_options({"calib": str(work / "calib")})
    assert QuantSettings.of(mixed).fallback == "fp16" and Target.parse(str(mixed)) == mixed
    with pytest.raises(TargetError, match="fp32, fp16"):
        QuantSettings.of(mixed.with_options({"fallback": "bf8"}))
    with pytest.raises(TargetError, match="CPU provider runs most FP16 ops in FP32"):  # it would be FP16 in name only
        QuantSettings.of(Target.parse("ort:cpu:int8@fallback=fp16"))
    model = quantize(graph, mixed).model  # what ORT CUDA / TensorRT get: no GPU needed to make it
    inits = {t.name: t.data_type for t in model.graph.initializer}
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    for name in (OUTLIER_CONV, CONSUMER):  # the float nodes: FP16 weights
        assert inits[convs[name].input[1]] == onnx.TensorProto.FLOAT16, name
    for name in set(convs) - {OUTLIER_CONV, CONSUMER}:  # the quantized ones: DQ(int8 weights) -> Conv -> Q, untouched
        assert convs[name].input[1].endswith("_DequantizeLinear_Output"), name
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("_scale")} == {onnx.TensorProto.FLOAT}  # Q/DQ untouched
    x = _image(7)
    fp32, fp16 = (make_runner(graph, Target.parse(f"emu:int8{pins}{o}").with_options({"calib": str(work / "calib")})).run(x)["y"]
                  for o in ("", "@fallback=fp16"))
    assert 0 < rel_l2(fp32, fp16) < 2e-2  # FP16 rounding of the two float convs (emulated), within FP16 tolerance


def test_fp16_fallback_overflow_is_caught_by_the_build_check(work, tmp_path):
    """conv2's outlier channel x1e5 (compensated in conv3): kept in float it is fine in FP32 and
    overflows FP16 (its outputs reach ~1e5 > 65504); the build of ort:cuda:int8@fallback=fp16 is
    checked with that FP16 emulated, so it is refused."""
    model = build_cnn_int8(True)
    inits = {t.name: t for t in model.graph.initializer}
    for name, scale, index in (("conv2.w", 100.0, (0,)), ("conv2.b", 100.0, (0,)), ("conv3.w", 0.01, (slice(None), 0))):
        value = numpy_helper.to_array(inits[name]).copy()
        value[index] *= scale
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    graph = ModelGraph(model, tmp_path / "big.onnx")
    calib = {"calib": str(work / "calib")}
    base = Target.parse(f"ort:cuda:int8+fp32={OUTLIER_CONV},{CONSUMER}").with_options(calib)
    assert build(graph, base, tmp_path / "fp32.onnx", check_inputs=_image(7)).passed
    refused = build(graph, base.with_options({"fallback": "fp16"}), tmp_path / "fp16.onnx", check_inputs=_image(7))
    assert not refused.written and refused.check.on == "emu:int8" and refused.check.diverging == ("y",)


def test_int8_plans_and_models_are_not_mistaken_for_others(work, tmp_path):
    fp16_plan = tmp_path / "fp16.json"
    fp16_plan.write_text(json.dumps({"precision": "fp16", "fp32_nodes": [{"node": OUTLIER_CONV}], "accept": ["rel_l2<=0.001"]}))
    with pytest.raises(InputError, match="searched for fp16"):
        Target.parse(f"ort:cpu:int8+{fp16_plan}")
    int8_plan = tmp_path / "int8.json"
    int8_plan.write_text(json.dumps({"precision": "int8", "fp32_nodes": [{"node": OUTLIER_CONV}],
                                     "quantization": {"settings": {"types": "u8s8", "reduce_range": True, "calibrate": "entropy"}}}))
    trt = Target.parse(f"trt:int8+{int8_plan}")  # TensorRT's quantization whatever the CPU plan was searched with
    assert trt.option_dict == {"calibrate": "entropy"} and QuantSettings.of(trt).types == "s8s8"
    # A QDQ model (here aligner's own, unstamped) is run as it is, never quantized again; TensorRT is told what it cannot take.
    qdq = quantize(ModelGraph.load(work / "fault.onnx"), Target.parse("ort:cpu:int8").with_options({"calib": str(work / "calib")})).model
    graph = ModelGraph(qdq, tmp_path / "qdq.onnx")
    with pytest.raises(InputError, match="quantized already"):
        quantize(graph, Target.parse("ort:cpu:int8"))
    assert make_runner(graph, Target.parse("ort:cpu:int8")).run(_image(7))["y"].shape == (1, 4, 16, 16)
    with pytest.raises(TargetError, match="int32 DequantizeLinear .* uint8 zero points"):
        make_runner(graph, Target.parse("trt:int8"))


def test_int8_build_writes_ort_optimized_graph_and_needs_calibration(work, capsys):
    out, optimized = work / "opt.int8.onnx", work / "opt.int8.ort.onnx"
    assert _cli(work, "--target", "ort:cpu:int8", "--plan", str(work / "plan.json"), "-o", str(out), "--ort-optimized", str(optimized)) == 0
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(optimized)).graph.node}  # ONNX Runtime's integer kernels, as deployed
    no_calib = main(["build", str(work / "fault.onnx"), "--target", "ort:cpu:int8", "--inputs", str(work / "held_out.npz"),
                     "-o", str(work / "nocalib.onnx")])
    assert no_calib == 2 and "needs calibration data" in capsys.readouterr().err and not (work / "nocalib.onnx").exists()


def test_compare_reads_a_qdq_model_quantized_elsewhere_through_its_qdq_pairs(work, tmp_path):
    """A QDQ model made by ONNX Runtime's quantizer called directly (not through aligner) given as
    --target-model: its tensors are read through its Q/DQ pairs, dequantized, in the float model's
    names — the same comparison as aligner quantizing the float model itself with the same settings."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from aligner.compare.layerwise import compare

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_image(100 + i) for i in range(8))

        def get_next(self):
            return next(self.it, None)

    elsewhere = tmp_path / "elsewhere.qdq.onnx"
    quantize_static(str(work / "fault.onnx"), str(elsewhere), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=vnni_missing())
    graph = ModelGraph.load(work / "fault.onnx")
    target = Target.parse("ort:cpu:int8").with_options({"calib": str(work / "calib")})
    own = compare(graph, target=target, feeds=_image(7))
    theirs = compare(graph, target=target, target_model=elsewhere, feeds=_image(7))
    assert [d.tensor for d in theirs.tensors] == [d.tensor for d in own.tensors] == ["a0", "a1", "a2", "a3", "y"]
    assert theirs.first_divergent.tensor == own.first_divergent.tensor == "a3"  # conv3 reads the outlier tensor quantized
    assert all(abs(a.metrics["rel_l2"] - b.metrics["rel_l2"]) < 1e-4 for a, b in zip(own.tensors, theirs.tensors))
