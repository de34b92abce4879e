"""aligner bisect --workers: the probes that are separate runs go to worker processes (the frontier
search asks its next levels ahead, a k-ary search; capture groups run side by side) and the verdict
is the serial one, on a model with an injected FP16 overflow whose node is known."""

from __future__ import annotations

import pytest

from aligner.search import bisect, bisect_cuts
from aligner.search.workers import make_executor
from aligner.search.frontier import next_cuts
from conftest import _export, build_cnn
from aligner.examples.faults import scale_weight


def test_the_cuts_sent_ahead_are_the_binary_searchs_next_levels():
    assert next_cuts(0, 16, 7) == [8, 4, 12, 2, 6, 10, 14] and next_cuts(0, 16, 1) == [8] and next_cuts(4, 5, 3) == []
    for predicate in (lambda k: k > 700, lambda k: 300 < k <= 400 or k > 800):
        plain, asked, told = [], [], []
        expected = bisect_cuts(1000, lambda k: plain.append(k) or predicate(k))
        got = bisect_cuts(1000, lambda k: asked.append(k) or predicate(k), ahead=told.append, width=7)
        assert got == expected and asked == plain  # the same calls, in the same order
        assert told[0][0] == 1000 and all(window[0] == k for window, k in zip(told, asked))  # each call was the first sent ahead
        assert all(k in window for window, k in zip(told, asked[1:]))  # ... and the next was already on its way


@pytest.fixture(scope="module")
def overflow(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("bisect_workers")
    path = _export(build_cnn(), (torch.randn(1, 3, 32, 32),), d / "cnn.onnx", dynamo=False)
    return scale_weight(path, d / "faulty.onnx", "Conv", 1e6, which=3)  # (model, the Conv whose FP16 output overflows)


@pytest.mark.parametrize("strategy,budget", [("frontier", 512), ("all", 0.05)])
def test_bisect_on_two_workers_gives_the_serial_verdict(overflow, strategy, budget):
    model, victim = overflow
    serial = bisect(model, target="emu:fp16", strategy=strategy, capture_budget_mb=budget)
    with make_executor(2) as executor:
        parallel = bisect(model, target="emu:fp16", strategy=strategy, capture_budget_mb=budget, workers=executor)
    assert serial.root_cause.node == victim and serial.root_cause.kind == "nonfinite"
    for got in (parallel.first_divergent.node, parallel.root_cause.node, parallel.nonfinite_origin.node):
        assert got == victim
    assert (parallel.root_cause.kind, parallel.outputs_diverge) == (serial.root_cause.kind, serial.outputs_diverge)
    assert executor.stats().tasks >= 2  # probes ran on the workers
    if strategy == "all":
        assert len([p for p in serial.probes if p.phase == "all"]) >= 2  # several groups to run side by side
        assert [r.to_dict() for r in parallel.local_errors] == [r.to_dict() for r in serial.local_errors]


def test_cli_bisect_workers(overflow, tmp_path):
    import json

    from aligner.cli.main import main

    model, victim = overflow
    docs = []
    for workers in ("1", "2"):
        out = tmp_path / f"bisect{workers}.json"
        assert main(["bisect", str(model), "--target", "emu:fp16", "--strategy", "frontier", "--workers", workers, "--json", str(out)]) == 1
        docs.append(json.loads(out.read_text()))
    assert docs[0]["root_cause"]["node"] == docs[1]["root_cause"]["node"] == victim
    assert main(["bisect", str(model), "--target", "emu:fp16", "--workers", "lots"]) == 2
