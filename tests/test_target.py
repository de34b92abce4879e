"""A target is one value: parsed once, printed back, with one tolerance policy for every command."""

import json

import pytest

from aligner.backends.target import Target, valid_targets
from aligner.compare.tolerance import default_tolerance, tolerance_for
from aligner.errors import InputError, TargetError


@pytest.mark.parametrize("spec", [
    "ort:cpu:fp32", "ort:cuda:fp16", "emu:fp16", "emu:bf16", "trt:fp16", "torch:cuda:autocast", "torch:cpu:fp32",
    "ort:cpu:fp16+fp32=/a/Pow,/a/Sqrt", "ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC,use_tf32=0",
    "emu:fp16+fp32=/n/Pow@x=1",
])
def test_str_round_trips(spec):
    target = Target.parse(spec)
    assert Target.parse(str(target)) == target


def test_short_forms_mean_the_defaults():
    assert Target.parse("ort") == Target.parse("ort:cpu:fp32")
    assert Target.parse("emu") == Target.parse("emu:cpu:fp16") == Target.parse("emu:fp16")
    assert str(Target.parse("trt")) == "trt:fp16"
    assert set(valid_targets()) >= {"ort:cpu:fp32", "emu:fp16", "trt:fp16", "torch:cuda:bf16"}


def test_plan_pins_arrive_one_way(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"fp32_nodes": [{"node": "/a/Pow"}, {"node": "/a/Sqrt"}]}))
    by_suffix = Target.parse(f"ort:cuda:fp16+{plan}")
    by_option = Target.parse("ort:cuda:fp16+plan", plan=plan)
    by_nodes = Target.parse("ort:cuda:fp16", pins=["/a/Pow", "/a/Sqrt"])
    assert by_suffix.pins == by_option.pins == by_nodes.pins == ("/a/Pow", "/a/Sqrt")
    assert str(by_suffix) == f"ort:cuda:fp16+{plan}" and Target.parse(str(by_suffix)) == by_suffix
    assert Target.parse(by_suffix, pins=["/b/Exp"]).pins == ("/a/Pow", "/a/Sqrt", "/b/Exp")


@pytest.mark.parametrize("spec, message", [
    ("trt:fp8", "Valid targets"),
    ("ort:gpu:fp16", "Valid targets"),
    ("ort:cpu:fp32+fp32=/a", "only apply to fp16/bf16"),
    ("ort:cuda:fp16@nokey", "@key=value"),
    ("trt:fp16@workspace_mb=512@builder_optimization_level=3", "single '@', separated by commas"),
    ("", "Unknown target"),
])
def test_bad_specs_say_what_to_write(spec, message):
    with pytest.raises(TargetError, match=message):
        Target.parse(spec)


def test_plan_suffix_without_a_plan_or_with_a_bad_file(tmp_path):
    with pytest.raises(InputError, match="--plan"):
        Target.parse("emu:fp16+plan")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(InputError, match="aligner precision"):
        Target.parse(f"emu:fp16+{tmp_path / 'x.json'}")


def test_one_tolerance_policy_for_same_graph_and_two_model_runs():
    fp16 = Target.parse("ort:cpu:fp16")
    # --target-model comparisons on an FP16 target use the FP16 default, as the same-graph run does
    assert tolerance_for(fp16, Target.parse("ort:cpu:fp32")) == default_tolerance("fp16")
    assert tolerance_for(Target.parse("emu:bf16")) == default_tolerance("bf16")
    assert tolerance_for(Target.parse("ort:cpu:fp32"), Target.parse("ort:cpu:fp16")) == default_tolerance("fp16")
    # --atol alone keeps the precision's threshold (it does not switch to the FP32 rule)
    only_atol = tolerance_for(fp16, atol=1e-3)
    assert only_atol.threshold == default_tolerance("fp16").threshold and only_atol.atol == 1e-3
    assert tolerance_for(fp16, metric="cosine").threshold == 0.999


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonsense_thresholds_are_refused(bad):
    with pytest.raises(InputError, match="finite"):
        tolerance_for(Target.parse("emu:fp16"), threshold=bad)
