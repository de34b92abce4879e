"""A runtime that crashes is a target failure with a message (exit 3), never the death of aligner.

The case is real: ONNX Runtime 1.2x's CPU provider segfaults while optimizing the example
detector's FP16 graph when only its output is fetched (issue 20). If a future ONNX Runtime stops
crashing there, the first test says so and must be replaced by another crashing model.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from aligner import bisect, make_inputs, make_runner
from aligner.errors import TargetRunError
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.search.crash import prefix_model
from aligner.search.frontier import spans


@pytest.fixture(scope="module")
def detector():
    return ModelGraph.load(shapes_detector_path())


def test_a_crashing_runtime_is_a_target_failure(detector):
    feeds = make_inputs(detector, {"pixels": (1, 3, 128, 128)})
    with pytest.raises(TargetRunError, match=r"ONNX Runtime crashed \(signal SIGSEGV\)") as info:
        make_runner(detector, "ort:cpu:fp16").run(feeds)
    assert "detections" in str(info.value)  # what was being run
    # the process lives on, and the next run starts a fresh child: the reference side is unaffected
    assert make_runner(detector, "ort:cpu:fp32").run(feeds)["detections"].shape[0] == 1


def test_bisect_reports_the_crash_with_exit_3(detector, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", "bisect", str(shapes_detector_path()), "--target", "ort:cpu:fp16",
                           "--strategy", "frontier", "--input-shapes", "pixels:1x3x128x128", "--json", str(tmp_path / "v.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "crashed" in proc.stdout and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["failure_site"]["node"] in proc.stdout.replace("\n", "")


def test_bisect_names_the_node_whose_presence_crashes_the_runtime(detector, tmp_path):
    feeds = make_inputs(detector, {"pixels": (1, 3, 128, 128)})
    result = bisect(detector, target="ort:cpu:fp16", strategy="frontier", feeds=feeds, save_repro=tmp_path / "repro")
    assert result.failed and not result.diverged and result.probes[0].status == "failed"
    site = result.failure_site
    assert site is not None and site.node in result.explanation
    # checked independently: the saved prefix ending at the named node crashes, one node fewer runs
    order = [n.name for n in detector.nodes if n.op_type != "Constant"]
    assert order[site.index] == site.node and site.prefix_nodes == site.index + 1
    with pytest.raises(TargetRunError, match="crashed"):
        make_runner(ModelGraph.load(site.repro), "ort:cpu:fp16").run(feeds)
    lives = spans([(sorted(_node_inputs(detector.node(x))), list(detector.node(x).output)) for x in order], detector.output_names)
    shorter = ModelGraph(prefix_model(detector, order, lives, site.index))
    assert make_runner(shorter, "ort:cpu:fp16").run(feeds)
    # the workaround it reports does run the whole model
    assert site.fixes and all(f.startswith("--") for f in site.fixes)
    if "--target-option graph_optimization_level=basic" in site.fixes:
        assert make_runner(detector, "ort:cpu:fp16@graph_optimization_level=basic").run(feeds)["detections"].shape[0] == 1


def test_sandbox_can_be_turned_off_and_gives_the_same_numbers(detector):
    feeds = make_inputs(detector, {"pixels": (1, 3, 128, 128)})
    names = detector.activations()[:5]
    boxed = make_runner(detector, "ort:cpu:fp32").run(feeds, names)
    inline = make_runner(detector, "ort:cpu:fp32@sandbox=0").run(feeds, names)
    assert all((boxed[n] == inline[n]).all() for n in names)


def test_the_sandbox_hands_back_every_kind_of_tensor_unchanged(tmp_path):
    """0-d, empty, integer, boolean and FP16 outputs cross the child's pipe with their shape and bits."""
    from onnx import TensorProto, helper

    import onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),  # 0-d
        helper.make_node("Shape", ["x"], ["shape"]),  # int64
        helper.make_node("Greater", ["x", "total"], ["mask"]),  # bool
        helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Slice", ["x", "zero", "zero", "one"], ["empty"]),  # shape (0, 3)
    ]
    zero, one = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("zero", 0), ("one", 0)))
    kinds = {"total": (TensorProto.FLOAT, []), "shape": (TensorProto.INT64, [2]), "mask": (TensorProto.BOOL, [2, 3]),
             "half": (TensorProto.FLOAT16, [2, 3]), "empty": (TensorProto.FLOAT, [0, 3])}
    outs = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in kinds.items()]
    model = helper.make_model(helper.make_graph(nodes, "kinds", [x], outs, [zero, one]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "kinds.onnx"
    onnx.save(model, path)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5}
    graph = ModelGraph.load(path)
    inside = make_runner(graph, "ort:cpu:fp32@sandbox=1").run(feeds)
    here = make_runner(graph, "ort:cpu:fp32@sandbox=0").run(feeds)
    assert set(inside) == set(here) == {"total", "shape", "mask", "half", "empty"}
    for name, value in here.items():
        assert inside[name].dtype == value.dtype and inside[name].shape == value.shape, name
        assert np.array_equal(inside[name], value), name
    assert inside["total"].shape == () and inside["empty"].shape == (0, 3)
