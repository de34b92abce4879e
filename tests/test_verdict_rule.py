"""One verdict rule (issue 27): precision's acceptance, build's check and compare judge an output
the same way, with the same --metric/--threshold/--atol and the same defaults.

The story: a DBNet-style detector whose probability map is ~0 on generated inputs (PP-OCR's
detector on random pixels). Relative error on ~0 outputs is noise, so a rule without an absolute
floor never passes: before, `aligner precision` pinned node after node and printed PASSED with
everything in FP32. The model here has one real FP16 problem — a BatchNormalization whose running
variance (1e8) is inf in FP16, so its channel becomes its bias — and the plan compare's rule implies
is exactly that node.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import make_runner, reference_runner
from aligner.cli.main import main
from aligner.compare import compare
from aligner.compare.metrics import METRICS, measure
from aligner.compare.tolerance import DEFAULT_TOLERANCES, Tolerance, defaults_text, parse_tolerance
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs
from aligner.search.acceptance import check_outputs
from aligner.search.precision import search_precision

BN = "backbone/BatchNormalization"


def quiet_detector() -> onnx.ModelProto:
    """Conv -> BatchNormalization (channel 0: running variance 1e8) -> Relu -> Conv -> Relu -> Conv -> Sigmoid.

    The head's Conv sums ~2032 and subtracts 2046, so the map is sigmoid(about -14): 1e-8 to 1e-5,
    ~0 everywhere. FP16 rounding moves each logit by a few 0.01 — a few % of relative error on the
    map, ~1e-7 absolute. The BatchNormalization in FP16 turns channel 0 into its bias (5), which
    moves every logit by ~+70: the map becomes 1."""
    rng = np.random.default_rng(0)
    c = 8
    mean, var, gamma, beta = np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(c, np.float32), np.zeros(c, np.float32)
    mean[0], var[0], gamma[0], beta[0] = 10.0, 1e8, 1e4, 5.0
    arrays = {"w1": rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32), "bn.scale": gamma, "bn.bias": beta, "bn.mean": mean,
              "bn.var": var, "w2": np.full((c, c, 3, 3), 0.02, np.float32), "b2": np.full(c, 100.0, np.float32),
              "w3": np.full((1, c, 3, 3), 0.28, np.float32), "b3": np.array([-2046.0], np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="backbone/Conv"),
             helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n1"], name=BN),
             helper.make_node("Relu", ["n1"], ["r1"], name="backbone/Relu"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="neck/Conv"),
             helper.make_node("Relu", ["c2"], ["r2"], name="neck/Relu"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="head/Conv"),
             helper.make_node("Sigmoid", ["c3"], ["maps"], name="head/Sigmoid")]
    graph = helper.make_graph(nodes, "quiet_detector", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1, 1, 26, 26])],
                              initializer=[numpy_helper.from_array(a, n) for n, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    path = tmp_path_factory.mktemp("quiet") / "det.onnx"
    onnx.save(quiet_detector(), str(path))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


# ---- the bug: outputs ~0 on generated inputs ----------------------------------------------------

def test_precision_on_a_map_that_is_about_zero_pins_only_the_overflowing_batchnorm(quiet, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    code, out, _ = _run(capsys, "precision", quiet, "--out", plan_path)
    plan = json.loads(plan_path.read_text())
    assert code == 0 and "PASSED" in out
    assert [p["node"] for p in plan["fp32_nodes"]] == [BN] and plan["passed"]
    assert plan["accept"] == ["rel_l2 <= 0.02 (or max_abs <= 0.001)"]  # compare's fp16 rule, recorded as it reads
    assert plan["final"]["metrics"]["rel_l2"] > 0.02 and plan["final"]["metrics"]["max_abs"] < 1e-4  # ~0 map: relative error is noise
    # compare says the same of that plan, and of pure FP16
    assert compare(quiet, target=f"emu:fp16+fp32={BN}").first_divergent is None
    assert compare(quiet, target="emu:fp16", tensors=["maps"]).first_divergent is not None


def test_an_output_passes_acceptance_exactly_when_compare_calls_it_within_tolerance(quiet):
    graph = ModelGraph.load(quiet)
    feeds = make_inputs(graph)
    ref = reference_runner(graph).run(feeds)
    rules = [DEFAULT_TOLERANCES["fp16"], Tolerance("rel_l2", 2e-2, 0.0), Tolerance("cosine", 0.999, 1e-6), Tolerance("max_abs", 1e-6, 0.0)]
    for pins in [(), (BN,), (BN, "head/Sigmoid"), (BN, "neck/Conv", "neck/Relu", "head/Conv", "head/Sigmoid")]:
        got = make_runner(graph, "emu:fp16", pins).run(feeds)
        for rule in rules:
            compared = compare(graph, target=f"emu:fp16+fp32={','.join(pins)}" if pins else "emu:fp16", feeds=feeds,
                               tensors=["maps"], tolerance=rule)
            assert (check_outputs(rule, ref, got) == "") == (compared.first_divergent is None), (pins, rule)


def test_the_old_rule_without_an_absolute_floor_is_written_out_and_pins_more(quiet, capsys):
    """rel_l2 alone (atol 0) on a ~0 map: rounding noise counts, so more nodes must stay FP32."""
    code, out, _ = _run(capsys, "precision", quiet, "--atol", "0")
    assert code == 0 and "accept: rel_l2 <= 0.02 (or max_abs <= 0)" in out
    pins = int(out.split(" pin(s)")[0].split()[-1])
    assert pins > 1


def test_a_search_stopped_by_its_cap_says_so_in_the_verdict_line(quiet, capsys):
    code, out, _ = _run(capsys, "precision", quiet, "--max-trials", "1")
    assert code == 1 and "NOT VERIFIED: stopped at the 1-trial cap (--max-trials) before any trial passed" in out
    assert "PASSED" not in out


def test_a_plan_that_keeps_everything_in_fp32_is_not_a_pass_of_fp16(quiet, capsys):
    """A rule nothing in FP16 meets (an exact map): all seven nodes FP32 is no FP16 plan, exit 1."""
    code, out, _ = _run(capsys, "precision", quiet, "--accept", "max_abs<=0", "--atol", "0")
    assert code == 1 and "NO PASSING PLAN: No FP16 plan: the rule passes only with every one of the 7 node(s) kept out of FP16" in out
    assert "PASSED" not in out


# ---- one grammar ----------------------------------------------------------------------------------

def test_the_printed_rule_reads_back_as_the_same_rule():
    fp16 = DEFAULT_TOLERANCES["fp16"]
    for specs in (["rel_l2<=5e-3"], ["rel_l2 <= 0.005 (or max_abs <= 1e-4)"], ["cosine>=0.999"], ["finite"],
                  ["rel_l2<=5e-3", "maps: snr_db>=30 (or max_abs<=1e-6)"], ["max_abs<=1e-5"]):
        rule = parse_tolerance(specs, fp16)
        assert parse_tolerance(rule.clauses(), fp16) == rule, specs
    assert parse_tolerance(["rel_l2<=5e-3"], fp16) == Tolerance("rel_l2", 5e-3, 1e-3)  # atol: the precision's default
    assert parse_tolerance(["max_abs<=1e-5"], fp16).describe() == "max_abs <= 1e-05"  # not loosened to the 1e-3 default
    assert parse_tolerance(["outputs finite", "rel_l2<=0.05"], DEFAULT_TOLERANCES["int8"]) == DEFAULT_TOLERANCES["int8"]  # old plans
    assert not parse_tolerance(["finite"], fp16).bounded


@pytest.mark.parametrize("spec, says", [
    ("max_abs<0", "write max_abs<=0"),
    ("cosine<=0.9", "cosine is higher-is-better: write cosine>=0.9"),
    ("rel_l3<=1e-3", "Unknown metric 'rel_l3'; choose from ['cosine', 'max_abs', 'mean_abs', 'mvre', 'rel_l2', 'snr_db']. Did you mean 'rel_l2'?"),
    ("rel_l2 below 3", "write METRIC<=VALUE"),
    ("rel_l2<=-1", "rel_l2 is never negative, so every output would fail"),
])
def test_a_clause_that_does_not_read_says_how_to_write_it(spec, says):
    with pytest.raises(InputError, match=None) as info:
        parse_tolerance([spec])
    assert says in str(info.value)


def test_one_rule_per_output_and_outputs_by_name(quiet, capsys):
    with pytest.raises(InputError, match="one rule applies to all outputs"):
        parse_tolerance(["rel_l2<=5e-3", "cosine>=0.999"])
    with pytest.raises(InputError, match="Unknown output 'map'.*Did you mean: 'maps'"):
        search_precision(quiet, samples=None, accept=parse_tolerance(["map: rel_l2<=1e-2"]))
    code, _, err = _run(capsys, "precision", quiet, "--accept", "rel_l2<=5e-3", "--threshold", "1e-3")
    assert code == 2 and "give one of them (--accept 'rel_l2<=5e-3' is --metric rel_l2 --threshold 5e-3)" in err


def test_help_texts_render_the_defaults_from_the_one_table(capsys):
    for command in ("precision", "compare", "build"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert defaults_text().split(", ")[2] in " ".join(capsys.readouterr().out.split()), command
    assert defaults_text().startswith("fp32 1e-4/1e-5, tf32 5e-3/1e-4, fp16 2e-2/1e-3")


# ---- build's check takes the same rule ------------------------------------------------------------

def test_build_checks_by_the_plans_rule_or_the_flags(quiet, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["precision", str(quiet), "--out", str(plan)]) == 0
    capsys.readouterr()
    out = tmp_path / "det.fp16.onnx"
    code, said, _ = _run(capsys, "build", quiet, "--target", "ort:cpu:fp16", "--plan", plan, "-o", out)
    assert code == 0 and json.loads((tmp_path / "det.fp16.onnx.json").read_text())["check"]["rule"] == "rel_l2 <= 0.02 (or max_abs <= 0.001)"
    code, said, _ = _run(capsys, "build", quiet, "--target", "ort:cpu:fp16", "--plan", plan, "-o", out, "--force", "--atol", "0")
    assert code == 1 and "not written" in said and "rel_l2 <= 0.02 (or max_abs <= 0) broken" in said



def test_a_plan_from_an_older_aligner_with_two_rules_still_builds_checked_by_the_first(quiet, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["precision", str(quiet), "--out", str(plan)]) == 0
    doc = json.loads(plan.read_text())
    doc["accept"] = ["outputs finite", "rel_l2<=0.02", "cosine>=0.999"]  # what older plans recorded (two bounds, old grammar)
    plan.write_text(json.dumps(doc))
    capsys.readouterr()
    code, said, _ = _run(capsys, "build", quiet, "--target", "ort:cpu:fp16", "--plan", plan, "-o", tmp_path / "det.fp16.onnx")
    assert code == 0 and "records several rules" in " ".join(said.split())


# ---- metrics written once -------------------------------------------------------------------------

def test_each_metric_function_is_the_one_pass_value():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(1000).astype(np.float32)
    test = ref + rng.standard_normal(1000).astype(np.float32) * 1e-2
    ref[3], test[7] = np.nan, np.inf
    every = measure(ref, test)[0]
    for name, fn in METRICS.items():
        assert math.isclose(fn(ref, test), every[name], rel_tol=1e-12), name


def test_compare_judges_an_output_by_its_own_rule_as_precision_does(quiet):
    graph = ModelGraph.load(quiet)
    out = graph.output_names[0]
    strict = parse_tolerance([f"{out}: rel_l2<=1e-6 (or max_abs <= 0)"], DEFAULT_TOLERANCES["fp16"])
    row = lambda r: next(t for t in r.tensors if t.tensor == out)  # noqa: E731
    default, judged = compare(graph, target="emu:fp16+fp32=backbone/BatchNormalization"), \
        compare(graph, target="emu:fp16+fp32=backbone/BatchNormalization", tolerance=strict)
    assert not row(default).diverges and row(judged).diverges  # the ~0 map passes the default atol, not its own rule
    others = [t for t in judged.tensors if t.tensor != out]
    assert [t.diverges for t in others] == [t.diverges for t in default.tensors if t.tensor != out]  # the rest: the whole-model rule
