"""Trials fan out: the precision search and eval coco on several workers give the serial answer.

Same plan, same trials log (order included) with 1, 2 and 4 local worker processes and on a local
Ray cluster; --resume across serial and parallel; a worker whose process dies is reported like
the sandbox reports a crashed runtime and the search goes on; eval coco over image shards equals
the serial result to the last digit.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import onnx
import pytest

from aligner.errors import InputError, TargetRunError
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import evaluate_detector
from aligner.examples import example_inputs, shapes_adapter, shapes_detector_path, shapes_preprocess, shapes_val, tiny_vit
from aligner.search.executor import parse_workers
from aligner.search.workers import make_executor
from aligner.search.executor_processes import ProcessExecutor
from aligner.search.pins import Trial, minimize, search_pins
from aligner.search.precision import Acceptance, search_precision

RULE = ["rel_l2<=2e-2"]


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "tiny_vit.onnx"
    onnx.save(tiny_vit(), str(path))
    return path


def _rows(log) -> list[tuple]:
    """What a trials log decided, in order (not the seconds or which worker ran it)."""
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return [(tuple(r["pins"]), r["passed"], r["phase"], r["culprit"], r["error"], r["reason"], json.dumps(r["metrics"])) for r in rows]


def _search(vit, log, workers, **kw):
    return search_precision(vit, samples=[example_inputs()], accept=Acceptance.parse(RULE), trials_log=log, workers=workers, **kw)


@pytest.fixture(scope="module")
def serial(vit, tmp_path_factory):
    log = tmp_path_factory.mktemp("serial") / "trials.jsonl"
    return _search(vit, log, 1), _rows(log)


# ---- the search over a check: what runs ahead is what the serial search checks next -------------

def _needs(required: set[str], calls: list):
    def check(pins: frozenset[str], phase: str) -> Trial:
        calls.append(pins)
        missing = sorted(required - pins)
        return Trial(pins, not missing, phase, culprit=missing[0] if missing else None)
    return check


@pytest.mark.parametrize("halve_above", [128, 4])
def test_look_ahead_names_the_checks_a_failing_run_makes_next(halve_above):
    seeds = [f"n{i}" for i in range(24)]
    for required in ({"n3", "n4", "n17"}, {"n0"}, set(seeds[::2])):
        plain, calls, said = [], [], []
        expected = minimize(seeds, _needs(required, plain), halve_above=halve_above)
        got = minimize(seeds, _needs(required, calls), halve_above=halve_above, ahead=lambda it: said.append(list(it)[:4]))
        assert got == expected and calls == plain  # the same checks, in the same order
        assert all(window[0] == pins for window, pins in zip(said, calls))  # each check was the head of what ran ahead
        followed = [(w, nxt) for w, pins, nxt in zip(said, calls, calls[1:]) if not required <= pins]  # after a failing check
        assert followed and all(nxt in w for w, nxt in followed)  # ... the next check had already been started
    plain, calls = [], []
    assert search_pins(["a", "b"], _needs({"a", "c"}, plain)) == search_pins(["a", "b"], _needs({"a", "c"}, calls), ahead=lambda it: None)


# ---- a precision search: the same plan and log on any number of workers -------------------------

@pytest.mark.parametrize("workers", [2, 4])
def test_precision_plan_and_trials_log_are_the_serial_ones(vit, serial, tmp_path, workers):
    plan, rows = serial
    assert plan.passed and len(plan.pins) == 4 and len(rows) == plan.trials
    log = tmp_path / "trials.jsonl"
    with make_executor(workers) as executor:
        again = _search(vit, log, executor)
    assert again.to_dict() == plan.to_dict()  # the plan file is byte for byte the serial one
    assert _rows(log) == rows
    stats = executor.stats()
    assert len(stats.workers) == workers and sum(w.tasks for w in stats.workers) >= plan.trials
    assert sum(1 for w in stats.workers if w.tasks) >= 2  # they shared the work


def test_resume_goes_on_across_serial_and_parallel(vit, serial, tmp_path):
    plan, rows = serial
    log = tmp_path / "trials.jsonl"
    cut = _search(vit, log, 2, max_trials=5)  # parallel, cut short ...
    assert not cut.passed and _rows(log) == rows[:5]
    done = _search(vit, log, 1, resume=log)  # ... finished serially
    assert done.fp32_nodes == plan.fp32_nodes and _rows(log) == rows
    log2 = tmp_path / "again.jsonl"
    _search(vit, log2, 1, max_trials=7)  # serial, cut short ...
    done = _search(vit, log2, 2, resume=log2)  # ... finished on two workers
    assert done.fp32_nodes == plan.fp32_nodes and _rows(log2) == rows


# ---- a worker that dies ------------------------------------------------------------------------

CRASH = frozenset({"/blocks.1/norm2/Sqrt", "/norm/Add", "/norm/Pow", "/norm/ReduceMean_1", "/norm/Sqrt"})  # a pin set the search
# checks while minimising (it passes; the first assertion of the test checks it is still one)


def _abort_on_crash_set(runner) -> str:
    """A task metric that takes the whole process down on one pin set, as a runtime that segfaults
    in-process does (an ONNX Runtime custom op, which the sandbox does not isolate)."""
    if frozenset(runner.target.pins) == CRASH:
        os.abort()
    return ""


def _raise_on_crash_set(runner) -> str:
    """The serial twin: the sandbox's report of a crashed runtime."""
    if frozenset(runner.target.pins) == CRASH:
        raise TargetRunError("ONNX Runtime crashed (signal SIGABRT)")
    return ""


def test_a_worker_that_dies_is_reported_and_the_search_goes_on(vit, serial, tmp_path):
    assert CRASH in {frozenset(r[0]) for r in serial[1]}
    log, twin_log = tmp_path / "trials.jsonl", tmp_path / "twin.jsonl"
    rule = Acceptance.parse(RULE)
    with ProcessExecutor(2) as executor:
        plan = search_precision(vit, samples=[example_inputs()], accept=replace(rule, task=_abort_on_crash_set), trials_log=log,
                                workers=executor)
    twin = search_precision(vit, samples=[example_inputs()], accept=replace(rule, task=_raise_on_crash_set), trials_log=twin_log)
    crashed = [r for r in _rows(log) if r[4]]
    assert len(crashed) == 1 and frozenset(crashed[0][0]) == CRASH and not crashed[0][1]
    assert "died (signal SIGABRT)" in crashed[0][4] and "the search goes on" in crashed[0][4]
    assert plan.passed and plan.fp32_nodes == twin.fp32_nodes  # went on exactly as the serial search past a crashed trial
    assert [r[:3] for r in _rows(log)] == [r[:3] for r in _rows(twin_log)]
    assert sum(w.crashed for w in executor.stats().workers) == 1


# ---- on a local Ray cluster --------------------------------------------------------------------

def test_precision_plan_on_a_local_ray_cluster(vit, serial, tmp_path):
    ray = pytest.importorskip("ray", reason="pip install aligner[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        log = tmp_path / "trials.jsonl"
        with make_executor("ray") as executor:
            plan = _search(vit, log, executor)
        assert plan.to_dict() == serial[0].to_dict() and _rows(log) == serial[1]
        stats = executor.stats()
        assert stats.kind == "ray" and len(stats.workers) == 2 and stats.tasks >= plan.trials
    finally:
        ray.shutdown()


# ---- eval coco over image shards ---------------------------------------------------------------

def test_eval_coco_sharded_equals_serial_to_the_last_digit():
    dataset = CocoDataset(*shapes_val(), limit=60)
    args = (shapes_detector_path(), dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32", "emu:fp16"])
    serial = evaluate_detector(*args, batch=8).to_dict()
    sharded = evaluate_detector(*args, batch=8, workers=2).to_dict()
    for doc in (serial, sharded):
        for row in doc["targets"].values():
            del row["seconds"], row["images_per_s"]
    assert sharded == serial  # AP, AR, every MVRE digit and the non-finite counts
    assert serial["targets"]["emu:fp16"]["AP"] > 0.5


# ---- choosing workers --------------------------------------------------------------------------

def test_workers_spec_errors_say_what_to_write():
    assert parse_workers("3") == 3 and parse_workers("ray") == "ray" and parse_workers("ray://head:10001") == "ray://head:10001"
    with pytest.raises(InputError, match="number of local worker processes.*'ray'.*ray://HOST:PORT"):
        parse_workers("lots")
    with pytest.raises(InputError, match="at least 1"):
        parse_workers(0)


def test_without_ray_the_error_names_the_extra():
    from aligner._optional import missing

    assert "pip install 'aligner[ray]'" in str(missing("ray", "--workers ray (trials as Ray tasks)"))


def test_cli_precision_workers_prints_each_workers_share(vit, serial, tmp_path, capsys):
    import numpy as np

    from aligner.cli.main import main

    np.savez(tmp_path / "in.npz", **example_inputs())
    out = tmp_path / "plan.json"
    code = main(["precision", str(vit), "--inputs", str(tmp_path / "in.npz"), "--accept", RULE[0], "--workers", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and json.loads(out.read_text())["fp32_nodes"] == serial[0].to_dict()["fp32_nodes"]
    assert "workers (processes): w1 " in err and ", w2 " in err and "over one at a time" in err
    assert "[w1]" in err or "[w2]" in err  # per-trial: which worker ran it


def test_cli_eval_coco_workers_writes_the_serial_json(tmp_path):
    from aligner.cli.main import main

    docs = []
    for workers in ("1", "2"):
        out = tmp_path / f"eval{workers}.json"
        assert main(["eval", "coco", "--limit", "24", "--batch", "8", "--workers", workers, "--json", str(out)]) == 0
        doc = json.loads(out.read_text())
        for row in doc["targets"].values():
            del row["seconds"], row["images_per_s"]
        docs.append(doc)
    assert docs[0] == docs[1]


# ---- a COCO trial split over image shards on idle workers ----------------------------------------

@pytest.fixture(scope="module")
def coco_search():
    """The example detector, its FP16 overflow (stem_norm) and a COCO AP acceptance on 48 val images
    in 4 batches: pure FP16 loses 0.009 AP, the seeds pass, both single removals fail."""
    from aligner.backends import reference_runner
    from aligner.eval.run import coco_acceptance
    from aligner.graph.model import ModelGraph

    dataset = CocoDataset(*shapes_val(), limit=48)
    graph = ModelGraph.load(shapes_detector_path())
    accept = coco_acceptance(dataset, shapes_adapter(), shapes_preprocess(), reference_runner(graph), max_drop=0.003, batch=12)
    images, _, _ = next(dataset.batches(shapes_preprocess(), 48))
    return graph, accept, [{"pixels": images}]


def test_a_coco_tasks_parts_merge_into_the_whole_verdict(coco_search):
    from aligner.backends import make_runner
    from aligner.search.trial_job import splits

    graph, accept, _ = coco_search
    task = accept.task
    assert splits(accept) == task.pieces == 4
    from aligner.eval.coco import evaluate_coco

    runner = make_runner(graph, "emu:fp16")  # pure FP16: the AP drop the acceptance refuses
    whole = task(runner)
    parts = [task.part(runner, shard) for shard in (range(0, 1), range(1, 3), range(3, 4))]
    assert whole.startswith("AP ") and task.merge(parts) == whole
    serial = evaluate_coco(task.dataset.gt, task.detect(runner), image_ids=task.dataset.image_ids)
    assert task.stats_of(parts).stats == serial.stats and serial["AP"] < task.ref_ap - task.max_drop  # all 12, every digit
    assert task.stats_of(parts).detections == serial.detections > 0


@pytest.mark.parametrize("rule", ["finite", "rel_l2<=1e-9"])
def test_a_trial_sent_as_parts_gives_the_whole_trials_result(coco_search, rule):
    """Part 0 also judges the outputs: a rule the outputs fail decides the trial there, as serially."""
    from aligner.backends import reference_runner
    from aligner.backends.target import Target
    from aligner.search.trial_job import TrialJob, Trials

    graph, accept, samples = coco_search
    accept = replace(Acceptance.parse([rule]), task=accept.task, task_name=accept.task_name)
    ref = reference_runner(graph)
    job = TrialJob(graph, Target.parse("emu:fp16"), samples, [ref.run(s) for s in samples], accept)
    pins = frozenset({"/stem_norm/Pow", "/stem_norm/ReduceMean_1"})
    with ProcessExecutor(2) as executor:
        executor.start(job)
        trials = Trials(executor, job)
        assert trials.parts == 2 and [list(s) for s in trials.shards] == [[0, 1], [2, 3]]
        got = [trials.result(trials.submit(p)) for p in (frozenset(), pins)]
    want = [job(p) for p in (frozenset(), pins)]
    assert [g.value for g in got] == want
    assert want[0].reason.startswith("AP " if rule == "finite" else "output ") and not want[0].passed
    assert want[1].passed == (rule == "finite")
    assert executor.stats().tasks >= 3 and executor.stats().kind == "processes"


def test_a_coco_search_on_workers_splits_trials_and_keeps_the_serial_plan(coco_search, tmp_path):
    graph, accept, samples = coco_search
    runs = {}
    for workers in (1, 2):
        log = tmp_path / f"trials-{workers}.jsonl"
        with make_executor(workers) as executor:
            plan = search_precision(graph, "emu:fp16", samples=samples, accept=accept, trials_log=log, workers=executor, max_trials=3)
        runs[workers] = plan, _rows(log), executor.stats()
    plan, rows, _ = runs[1]  # cut at 3 trials (the 4th, the other removal, runs ahead on workers and is discarded)
    assert not plan.passed and plan.fp32_nodes == ["/stem_norm/Pow", "/stem_norm/ReduceMean_1"] and plan.trials == 3
    assert [r[2] for r in rows] == ["pure", "seed", "minimize"] and rows[0][5].startswith("AP ") and rows[1][1] and not rows[2][1]
    again, again_rows, stats = runs[2]
    assert again.to_dict() == plan.to_dict() and again_rows == rows
    assert stats.tasks > plan.trials and all(w.tasks for w in stats.workers)  # trials ran as parts, on both workers
