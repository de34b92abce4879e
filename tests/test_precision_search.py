"""aligner precision: verified, node-level, 1-minimal pin sets on models with known overflow sites."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from aligner.backends import make_runner, reference_runner
from aligner.compare.metrics import rel_l2
from aligner.graph.model import ModelGraph
from aligner.graph.precision import rewrite_precision
from aligner.inputs import make_inputs
from aligner.search.pins import Trial, minimize, search_pins
from aligner.search.precision import Acceptance, search_precision
from conftest import _export, build_cnn, export_detr
from aligner.examples.faults import inject_overflow_site, overflowing_nodes


# ---- the search over a check, without a runtime --------------------------------------------------

def _needs(required: set[str], log: list):
    def check(pins: frozenset[str], phase: str) -> Trial:
        log.append(pins)
        missing = sorted(required - pins)
        return Trial(pins, not missing, phase, culprit=missing[0] if missing else None)
    return check


def test_minimize_keeps_exactly_the_necessary_pins():
    required = {"n3", "n40", "n41", "n77"}
    seeds = [f"n{i}" for i in range(0, 100, 3)] + ["n40", "n41", "n77"]
    for halve_above in (128, 8):  # one trial per seed, or halving first when seeds are many
        log = []
        kept = minimize(seeds, _needs(required, log), halve_above=halve_above)
        assert set(kept) == required
        assert all(frozenset(required - {p}) in log for p in required)  # each pin proven necessary
    assert len(log) < len(seeds)  # halving is cheaper than one trial per seed when most are not needed


def test_search_grows_missing_pins_and_passes_pure_models_in_one_trial():
    log = []
    pins, trial = search_pins(["a", "b"], _needs({"a", "c"}, log))  # "c" was not a seed: found by growing
    assert set(pins) == {"a", "c"} and trial.passed
    log.clear()
    pins, trial = search_pins(["a"], _needs(set(), log))
    assert pins == [] and len(log) == 1


# ---- real models: injected overflow sites ----------------------------------------------------------

def _sites_model(path, pairs) -> tuple[ModelGraph, dict, set[str]]:
    graph = ModelGraph.load(path)
    feeds = make_inputs(graph)
    for first, second in pairs:
        inject_overflow_site(graph, first, second, feeds)
    graph = ModelGraph(graph.model)
    return graph, feeds, overflowing_nodes(graph, feeds)


def _passes(graph, feeds, pins, tol=2e-2) -> bool:
    ref = reference_runner(graph).run(feeds)
    got = make_runner(graph, "emu:fp16", pins).run(feeds)
    return all(np.isfinite(got[k]).all() and rel_l2(v, got[k]) <= tol for k, v in ref.items() if v.dtype.kind == "f")


def _assert_minimal(graph, feeds, plan):
    pins = set(plan.fp32_nodes)
    assert plan.passed and _passes(graph, feeds, pins)
    for pin in pins:  # 1-minimal: every pin is necessary
        assert not _passes(graph, feeds, pins - {pin}), f"{pin} is not necessary"


@pytest.fixture(scope="module")
def cnn_legacy(tmp_path_factory):
    import torch

    return _export(build_cnn(), (torch.randn(1, 3, 32, 32),), tmp_path_factory.mktemp("p") / "cnn.onnx", dynamo=False)


@pytest.mark.parametrize("pairs", [
    [("/layer2/conv1/Conv", "/layer2/conv2/Conv")],
    [("/layer1/conv1/Conv", "/layer1/conv2/Conv"), ("/layer2/conv1/Conv", "/layer2/conv2/Conv"),
     ("/layer3/conv1/Conv", "/layer3/conv2/Conv")],
], ids=["k1", "k3"])
def test_cnn_plan_pins_exactly_the_overflow_sites(cnn_legacy, pairs):
    graph, feeds, expected = _sites_model(cnn_legacy, pairs)
    assert len(expected) == 3 * len(pairs)  # conv (writes) -> relu (reads, writes) -> conv (reads) per site
    plan = search_precision(graph, samples=[feeds])
    assert set(plan.fp32_nodes) == expected
    _assert_minimal(graph, feeds, plan)


def _ffn(layer: str) -> tuple[str, str]:
    return f"/detr/model/{layer}/mlp/fc1/MatMul", f"/detr/model/{layer}/mlp/fc2/MatMul"


@pytest.mark.parametrize("layers", [["encoder/layers.1"], ["encoder/layers.0", "encoder/layers.1", "decoder/layers.1"]], ids=["k1", "k3"])
def test_transformer_plan_pins_exactly_the_overflow_sites(tmp_path_factory, layers):
    path = export_detr("legacy", tmp_path_factory.mktemp("detr"))
    graph, feeds, expected = _sites_model(path, [_ffn(layer) for layer in layers])
    assert len(expected) == 4 * len(layers)  # fc1 MatMul -> bias Add -> ReLU -> fc2 MatMul per site
    plan = search_precision(graph, samples=[feeds])
    assert set(plan.fp32_nodes) == expected
    _assert_minimal(graph, feeds, plan)
    assert plan.trials <= 2 + 2 * len(expected)  # pure, seeds, then about one trial per pin


def test_batchnorm_with_variance_beyond_fp16_is_pinned_and_keeps_fp32_statistics(tmp_path):
    import torch
    from torch import nn

    class Net(nn.Module):  # BatchNormalization after a residual Add: the exporter cannot fold it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x) + x.mean(dim=1, keepdim=True))))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_var[:4] = 2.0e5  # as in real detectors: statistics of large activations
        net.bn.running_mean[:4] = -300.0
    path = _export(net, (torch.rand(1, 3, 16, 16),), tmp_path / "bn.onnx", dynamo=False)
    graph = ModelGraph.load(path)
    bn = next(n.name for n in graph.nodes if n.op_type == "BatchNormalization")
    plan = search_precision(graph)
    assert plan.passed and bn in plan.fp32_nodes
    assert "2e+05" in next(p.reason for p in plan.pins if p.node == bn)
    mixed = ModelGraph(rewrite_precision(graph, plan.fp32_nodes, "fp16").model)
    var = mixed.node(bn).input[4]
    assert mixed.initializers[var].data_type == onnx.TensorProto.FLOAT


def test_model_that_passes_in_fp16_gets_an_empty_plan_in_one_trial(cnn_legacy):
    plan = search_precision(cnn_legacy)
    assert plan.passed and plan.pins == () and plan.trials == 1


def test_external_check_and_resume(vit_path, vit_inputs, tmp_path):
    calls = []

    def finite_logits(model: onnx.ModelProto) -> bool:  # a stand-in for a task metric on the mixed model
        calls.append(model)
        return True

    accept = Acceptance.parse(["rel_l2<=2e-2"], check=finite_logits)
    log = tmp_path / "trials.jsonl"
    plan = search_precision(vit_path, samples=[vit_inputs], accept=accept, trials_log=log)
    assert plan.passed and calls  # the callable judged the passing candidates
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["header"]["target"] == "emu:fp16" and len(lines) == plan.trials + 1
    again = search_precision(vit_path, samples=[vit_inputs], accept=accept, resume=log)
    assert again.trials == plan.trials and any("0 new" in n for n in again.notes)  # every trial came from the log
    assert again.fp32_nodes == plan.fp32_nodes


def test_a_target_that_fails_to_build_is_an_error_not_a_failed_check(vit_path, vit_inputs, tmp_path):
    log = tmp_path / "trials.jsonl"
    plan = search_precision(vit_path, target="ort:cpu:bf16", samples=[vit_inputs], trials_log=log)  # ORT CPU: no BF16 Add
    assert not plan.passed
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert rows and all(r["error"] and not r["passed"] for r in rows) and "Add" in rows[0]["error"]


def test_accept_command_judges_the_mixed_model(vit_path, vit_inputs, tmp_path):
    marker = tmp_path / "calls.txt"
    script = tmp_path / "judge.py"
    script.write_text("import sys, onnx\nm = onnx.load(sys.argv[1])\nopen(sys.argv[2], 'a').write('x')\n"
                      "sys.exit(0 if any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer) else 1)\n")
    import sys

    accept = Acceptance.parse([], command=f"{sys.executable} {script} {{model}} {marker}")
    plan = search_precision(vit_path, samples=[vit_inputs], accept=accept)
    assert plan.passed and marker.read_text()  # the command ran on a real FP16 model and said yes
