"""Issue 20: the precision search never gives up while a plan exists, and its trials log survives a
hard kill and a second search writing the same file."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import make_runner, reference_runner
from aligner.compare.metrics import rel_l2
from aligner.errors import InputError
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph
from aligner.search.pins import Trial, search_pins
from aligner.search.plan import TrialLog
from aligner.search.precision import Acceptance, search_precision

X = np.array([[0.3, -1.7, 2.9, 0.11, 5.3, -0.7, 1.3, 3.7]], dtype=np.float32)


STRICT = "rel_l2<=1e-7 (or max_abs<=0)"  # every FP16 rounding of these outputs breaks it
X_EXACT = np.array([[0.25, -1.75, 2.875, 0.125, 5.25, -0.75, 1.25, 3.75]], dtype=np.float32)  # FP16 holds these exactly


def three_node_model(relu_first: bool = False) -> ModelGraph:
    """x -> Mul(w) -> Add(b) -> Tanh: nothing overflows, every node rounds in FP16; ``relu_first``
    puts a Relu before them, exact in FP16 on :data:`X_EXACT`."""
    nodes = [helper.make_node("Relu", ["x"], ["x0"], name="in/Relu")] if relu_first else []
    nodes += [helper.make_node("Mul", ["x0" if relu_first else "x", "w"], ["m"], name="scale/Mul"),
             helper.make_node("Add", ["m", "b"], ["a"], name="shift/Add"),
             helper.make_node("Tanh", ["a"], ["y"], name="act/Tanh")]
    inits = [numpy_helper.from_array(np.linspace(0.1, 0.9, 8, dtype=np.float32)[None], "w"),
             numpy_helper.from_array(np.full((1, 8), 0.013, np.float32), "b")]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    return ModelGraph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _one_minimal(plan, log_path) -> bool:
    """Every pin was shown necessary: the log holds a failing trial with that one pin removed."""
    failing = {frozenset(r["pins"]) for r in _rows(log_path) if not r["passed"]}
    return all(frozenset(set(plan.fp32_nodes) - {p}) in failing for p in plan.fp32_nodes)


# ---- the grow step always makes progress ---------------------------------------------------------

def test_search_without_culprits_still_finds_the_required_pins():
    """No trial names a culprit (the error is spread thin): growing pins everything, then minimises."""
    universe = [f"n{i}" for i in range(12)]
    required = {"n2", "n9"}
    tried = []

    def check(pins: frozenset[str], phase: str) -> Trial:
        tried.append(pins)
        return Trial(pins, required <= pins, phase)

    pins, trial = search_pins(["n0"], check, universe=universe)
    assert trial is not None and trial.passed and set(pins) == required
    assert all(frozenset(required - {p}) in tried for p in required)  # each pin proven necessary


def test_strict_bound_on_the_three_node_model_pins_what_it_needs(tmp_path):
    log_path = tmp_path / "t.jsonl"
    plan = search_precision(three_node_model(True), "emu:fp16", [{"x": X_EXACT}], Acceptance.parse([STRICT]), trials_log=log_path)
    assert plan.passed, plan.notes
    assert set(plan.fp32_nodes) == {"scale/Mul", "shift/Add", "act/Tanh"}  # every rounding breaks the rule; the Relu is exact
    assert _one_minimal(plan, log_path)


def test_a_rule_only_all_fp32_meets_is_no_fp16_plan(tmp_path):
    """Every node must stay FP32 for the rule: that is no FP16 plan, never a pass of FP16."""
    plan = search_precision(three_node_model(), "emu:fp16", [{"x": X}], Acceptance.parse([STRICT]))
    assert not plan.passed and set(plan.fp32_nodes) == {"scale/Mul", "shift/Add", "act/Tanh"}
    assert plan.notes[0].startswith("No FP16 plan: the rule passes only with every one of the 3 node(s) kept out of FP16")


def test_strict_bound_on_the_example_detector_finds_a_passing_plan(tmp_path):
    """Raw 0-255 pixels, rel_l2 <= 1e-4: the divergence has no single culprit, yet a plan exists."""
    graph = ModelGraph.load(shapes_detector_path())
    pixels = np.random.default_rng(0).uniform(0, 255, size=(1, 3, 128, 128)).astype(np.float32)
    log_path = tmp_path / "detector.trials.jsonl"
    plan = search_precision(graph, "emu:fp16", [{"pixels": pixels}], Acceptance.parse(["rel_l2<=1e-4"]),
                            trials_log=log_path, max_trials=400)
    assert plan.passed, plan.notes
    assert 0 < len(plan.pins) < len(graph.nodes) // 4  # a small plan, not "everything"
    assert _one_minimal(plan, log_path)
    ref = reference_runner(graph).run({"pixels": pixels})
    got = make_runner(graph, "emu:fp16", plan.fp32_nodes).run({"pixels": pixels})  # the plan verified again
    assert all(rel_l2(ref[k], got[k]) <= 1e-4 for k in ref)
    assert len(_rows(log_path)) == plan.trials


def test_when_even_all_pinned_fails_the_plan_says_no_plan_exists():
    plan = search_precision(three_node_model(), "emu:fp16", [{"x": X}], Acceptance.parse(check=lambda model: False))
    assert not plan.passed and plan.pins == ()
    assert plan.notes[0].startswith("No plan exists for this acceptance: even with all 3 node(s) kept in FP32")


# ---- the trials log -----------------------------------------------------------------------------

def test_a_torn_last_line_is_dropped_and_resume_numbers_on(tmp_path, caplog):
    graph, accept, log_path = three_node_model(True), Acceptance.parse([STRICT]), tmp_path / "t.jsonl"
    first = search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, trials_log=log_path, max_trials=3)
    assert first.trials == 3 and not first.passed  # a passing trial (all pinned), not yet minimal: not verified
    assert first.notes[0].startswith("stopped at the 3-trial cap (--max-trials) while minimising")
    with open(log_path, "a") as f:
        f.write('{"pins": ["scale/Mul", "shi')  # killed in the middle of a line
    numbers = []
    with caplog.at_level(logging.WARNING, logger="aligner.search.plan"):
        plan = search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, trials_log=log_path, resume=log_path,
                                progress=lambda trial, n: numbers.append(n))
    assert "torn last line 5" in caplog.text
    assert plan.passed and numbers[0] == 4  # numbering continues after the 3 resumed trials
    rows = _rows(log_path)  # every line parses again: the torn tail was cut before appending
    assert plan.trials == len(rows) == 3 + len(numbers) and any("resumed 3 trial(s)" in n for n in plan.notes)


def test_a_damaged_middle_line_is_named(tmp_path):
    graph, accept, log_path = three_node_model(True), Acceptance.parse([STRICT]), tmp_path / "t.jsonl"
    search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, trials_log=log_path, max_trials=3)
    lines = log_path.read_text().splitlines()
    lines[2] = lines[2][:20]
    log_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 3 is not a trial"):
        search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, resume=log_path)


def test_two_searches_cannot_write_one_trials_log(tmp_path):
    graph, accept, log_path = three_node_model(True), Acceptance.parse([STRICT]), tmp_path / "t.jsonl"
    with TrialLog(log_path, {"target": "another search"}):  # a search in progress holds the log
        with pytest.raises(InputError, match="being written by another aligner precision search"):
            search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, trials_log=log_path)
        assert json.loads(log_path.read_text())["header"]["target"] == "another search"  # untouched
    plan = search_precision(graph, "emu:fp16", [{"x": X_EXACT}], accept, trials_log=log_path)  # released: it may go on
    assert plan.passed and not (tmp_path / "t.jsonl.lock").exists()
