"""The INT8 search finishes and fans out: 1-minimal in few trials where most kept nodes can go, and the
same plan and trials log on 1 or 2 worker processes and on a local Ray cluster (about 12 s on a quiet 2-core machine).

The model: a Conv+Relu chain (tests/test_int8_scale.conv_net) whose INT8 error, at a tight acceptance
(rel_l2 <= 0.01), needs several nodes kept in float; the search sweeps six quantizer settings,
ranks the quantized tensors and runs about twenty trials on ONNX Runtime's integer kernels.
"""

from __future__ import annotations

import copy
import json
import random

import onnx
import pytest

from aligner.backends import make_runner, reference_runner
from aligner.backends.target import Target
from aligner.errors import InputError
from aligner.search.acceptance import Acceptance, check_outputs
from aligner.search.workers import make_executor
from aligner.search.pins import Trial, minimize, thin
from aligner.search.precision import search_precision
from test_int8_scale import _calib_dir, _image, conv_net

RULE = ["rel_l2<=0.01"]


# ---- thin: a 1-minimal subset, in blocks where pins can go ---------------------------------------

def _needs(required: set[str], calls: list):
    def check(pins: frozenset[str], phase: str) -> Trial:
        calls.append(pins)
        return Trial(pins, required <= pins, phase)
    return check


@pytest.mark.parametrize("n,k", [(154, 5), (154, 40), (60, 60), (200, 1)])
def test_thin_is_one_minimal_and_cheap_where_most_pins_go(n, k):
    pins = [f"n{i}" for i in range(n)]
    required = set(random.Random(n + k).sample(pins, k))
    calls, single = [], []
    kept = thin(pins, _needs(required, calls))
    assert set(kept) == required
    for pin in kept:  # 1-minimal, checked apart from the search: without any one kept pin the check fails
        assert not _needs(required, [])(frozenset(kept) - {pin}, "proof").passed
    minimize(pins, _needs(required, single), halve_above=n + 1)  # the node-by-node removal it replaces
    if k <= n // 4:
        assert len(set(calls)) <= len(set(single)) // 2  # most can go: far fewer trials (154/5: 52 vs 160)
    assert len(set(calls)) <= len(set(single)) + 3 + k // 10  # all necessary: about one trial per pin, as before


def test_thin_is_one_minimal_where_removals_interact():
    """Removing h alone fails while x is kept, and passes once x is gone (not monotone): a second pass
    over the set finds it, and the result is 1-minimal against the final set."""
    def check(pins: frozenset, phase: str) -> Trial:
        return Trial(pins, {"a", "b"} <= pins and ("x" in pins or "h" not in pins), phase)

    pins = ["h"] + [f"n{i}" for i in range(12)] + ["x", "a", "b"]
    kept = thin(pins, check)
    assert sorted(kept) == ["a", "b"]
    assert all(not check(frozenset(kept) - {p}, "").passed for p in kept)


def test_thin_ahead_names_the_checks_to_come_and_changes_nothing():
    pins = [f"n{i}" for i in range(40)]
    for required in ({"n3", "n4", "n17"}, set(pins[::3]), set(pins)):
        plain, calls, said = [], [], []
        expected = thin(pins, _needs(required, plain))
        got = thin(pins, _needs(required, calls), ahead=lambda it: said.append(list(it)))
        assert got == expected and calls == plain  # the same checks in the same order
        assert all(window[0] == pins for window, pins in zip(said, calls))  # each check heads what ran ahead
        hits = sum(nxt in window for window, nxt in zip(said, calls[1:]))
        assert hits >= len(calls) // 2  # the next check was mostly among those started ahead


# ---- the INT8 search on real kernels: 1-minimal, and the same on any number of workers ----------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8_workers")
    model = root / "net.onnx"
    onnx.save(conv_net(size=16, channels=8, layers=6, seed=3), str(model))
    target = Target.parse("ort:cpu:int8").with_options({"calib": str(_calib_dir(root, 8, 16))})
    return model, target, [_image(i, 16) for i in range(3)]


def _search(case, log, workers, **kw):
    model, target, samples = case
    return search_precision(model, target, samples=samples, accept=Acceptance.parse(RULE), trials_log=log, workers=workers, sweep=True,
                            **kw)


def _rows(log) -> list[tuple]:
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return [(tuple(r["pins"]), r["passed"], r["phase"], r["error"], r["reason"], json.dumps(r["metrics"])) for r in rows]


def _plan(plan) -> dict:
    """The plan file without the seconds each sweep setting took."""
    doc = copy.deepcopy(plan.to_dict())
    for point in doc["quantization"].get("sweep", []):
        point.pop("seconds")
    return doc


@pytest.fixture(scope="module")
def serial(case, tmp_path_factory):
    log = tmp_path_factory.mktemp("serial") / "trials.jsonl"
    return _search(case, log, 1), _rows(log)


def test_int8_plan_is_one_minimal_on_the_real_kernels(case, serial):
    plan, rows = serial
    model, target, samples = case
    assert plan.passed and len(plan.fp32_nodes) >= 3 and plan.trials == len(rows) >= 10
    assert {"pure", "rank", "minimize"} <= {r[2] for r in rows}
    assert len(plan.quantization["sweep"]) == 6  # three calibration methods x reduce_range
    from aligner.graph.model import ModelGraph

    graph = ModelGraph.load(model)
    target = Target.parse(plan.target)  # the swept settings and the calibration data
    expected = [reference_runner(graph).run(s) for s in samples]
    rule = Acceptance.parse(RULE)  # as the search judged
    runner = make_runner(graph, target.with_pins(plan.fp32_nodes))
    assert not any(check_outputs(rule, e, runner.run(s)) for s, e in zip(samples, expected))  # the plan passes
    for pin in plan.fp32_nodes:  # each kept node removed alone: quantized again by ONNX Runtime, and it fails
        runner = make_runner(graph, target.with_pins([p for p in plan.fp32_nodes if p != pin]))
        assert any(check_outputs(rule, e, runner.run(s)) for s, e in zip(samples, expected)), pin


def test_int8_plan_and_trials_log_are_the_serial_ones_on_two_workers(case, serial, tmp_path):
    plan, rows = serial
    log = tmp_path / "trials.jsonl"
    with make_executor(2) as executor:
        again = _search(case, log, executor)
    assert _plan(again) == _plan(plan) and _rows(log) == rows
    stats = executor.stats()
    assert all(w.tasks for w in stats.workers)  # both ran sweep settings or trials
    assert stats.tasks >= plan.trials + len(plan.quantization["sweep"]) + 2  # the sweep and the ranking's chunks ran on them too


def test_int8_plan_on_a_local_ray_cluster(case, serial, tmp_path):
    ray = pytest.importorskip("ray", reason="pip install aligner[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        log = tmp_path / "trials.jsonl"
        with make_executor("ray") as executor:
            plan = _search(case, log, executor)
        assert _plan(plan) == _plan(serial[0]) and _rows(log) == serial[1]
        assert executor.stats().kind == "ray"
    finally:
        ray.shutdown()


def test_a_worker_quantizes_from_the_ranges_it_is_given_not_the_data(case, tmp_path):
    """The INT8 job carries the computed ranges: in a process where the calibration data is gone, a
    trial quantizes exactly as the search's process does."""
    import subprocess
    import sys

    from aligner.graph.model import ModelGraph
    from aligner.quant.quantize import calibrate_ranges, calibration_state, quantize
    from aligner.search.executor import pack_job
    from aligner.search.int8 import QuantizedTrialJob

    model, target, samples = case
    graph = ModelGraph.load(model)
    calibrate_ranges(graph, target, ("minmax",))
    state = calibration_state(graph, target)
    job = QuantizedTrialJob(graph, target, samples, [reference_runner(graph).run(s) for s in samples], Acceptance.parse(RULE), state)
    here = quantize(graph, target, exclude=["conv2"]).model
    (tmp_path / "job.bin").write_bytes(pack_job(job))
    script = ("import pickle, sys, shutil\n"
              "job = pickle.loads(open(sys.argv[1], 'rb').read())\n"
              "from aligner.quant.quantize import quantize\n"
              "job.state.install()\n"
              "open(sys.argv[2], 'wb').write(quantize(job.graph, job.target, exclude=['conv2']).model.SerializeToString())\n")
    calib = target.option_dict["calib"]
    moved = tmp_path / "moved"
    import shutil

    shutil.move(calib, moved)  # the data is not where the target says
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "job.bin"), str(tmp_path / "q.onnx")], capture_output=True, text=True)
    finally:
        shutil.move(moved, calib)
    assert proc.returncode == 0, proc.stderr[-800:]
    there = onnx.load(str(tmp_path / "q.onnx"))
    assert there.graph.SerializeToString() == here.graph.SerializeToString()
    assert state.ranges


# ---- --capture-budget-mb: the search's captures in smaller groups, the same plan ---------------

def test_capture_budget_bounds_isolation_and_keeps_the_plan(case, serial, tmp_path):
    from aligner.quant.calib import reporting

    phases: dict[str, int] = {}

    def seen(phase: str, done: int, total: int) -> None:
        if phase.startswith("isolating"):
            phases[phase] = total

    log = tmp_path / "trials.jsonl"
    with reporting(seen):
        small = _search(case, log, 1, capture_budget_mb=0)  # one tensor's unit per isolation run
    assert small.fp32_nodes == serial[0].fp32_nodes and _rows(log) == serial[1]
    (runs,) = phases.values()
    assert runs > 1  # at the default budget this model's units fit one run
    with pytest.raises(InputError, match="capture budget"):
        _search(case, tmp_path / "x.jsonl", 1, capture_budget_mb=-1)


def test_cli_precision_refuses_a_negative_capture_budget(case, tmp_path, capsys):
    from aligner.cli.main import main

    model, _, _ = case
    with pytest.raises(SystemExit) as exit_:
        main(["precision", str(model), "--target", "ort:cpu:int8", "--capture-budget-mb=-5"])
    assert exit_.value.code == 2 and "--capture-budget-mb: '-5': give a number >= 0" in capsys.readouterr().err


def test_a_search_cut_short_says_how_many_kept_nodes_are_shown_necessary(case, serial, tmp_path):
    import re

    plan, rows = serial
    log = tmp_path / "trials.jsonl"
    cut = _search(case, log, 1, max_trials=len(rows) - 1)  # stops while minimising
    assert not cut.passed
    found = re.search(r"stopped at the \d+-trial cap .* keeps (\d+) node\(s\) in float, (\d+) of them shown necessary", cut.notes[0])
    assert found, cut.notes[0]
    best = None
    for pins, passed, *_ in _rows(log):  # the passing trial with the fewest nodes, as the search keeps it
        if passed and (best is None or len(pins) <= len(best)):
            best = frozenset(pins)
    failed = {frozenset(pins) for pins, passed, _, error, *_ in _rows(log) if not passed and not error}
    assert int(found.group(1)) == len(best) and int(found.group(2)) == sum(best - {p} in failed for p in best) > 0
