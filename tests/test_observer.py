"""Observer-safe capture: compare what the target deploys, not what capturing makes it compute.

ONNX Runtime fuses a decomposed LayerNorm into one kernel that computes in FP32 inside; capturing
the LayerNorm's inner tensors makes them graph outputs, stops the fusion and the FP16 square
overflows. The fusion-emulating emulator (``emu:fp16@fusions=ort``) reproduces that on any CPU.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from aligner import bisect, compare, make_runner
from aligner.search.precision import search_precision
from aligner.examples import example_inputs, tiny_vit
from aligner.graph.deployed import kernels_of_onnx, map_deployed
from aligner.graph.model import ModelGraph


def _fusion_model() -> onnx.ModelProto:
    """Conv+Relu, MatMul+Add (2-D), a decomposed GELU and a decomposed LayerNorm: fusions ORT CPU applies."""
    rng = np.random.default_rng(0)
    init = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv/W"),
            nh.from_array(rng.standard_normal(4).astype(np.float32), "conv/B"),
            nh.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.1, "fc/W"),
            nh.from_array(rng.standard_normal(16).astype(np.float32), "fc/B"),
            nh.from_array(np.array([-1, 64], np.int64), "shape"),
            nh.from_array(np.array(1.4142135, np.float32), "sqrt2"), nh.from_array(np.array(1.0, np.float32), "one"),
            nh.from_array(np.array(0.5, np.float32), "half"), nh.from_array(np.array(2.0, np.float32), "two"),
            nh.from_array(np.array(1e-5, np.float32), "eps"), nh.from_array(np.ones(16, np.float32), "ln/g"),
            nh.from_array(np.zeros(16, np.float32), "ln/b")]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "conv/W", "conv/B"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"], name="/conv/Relu"),
        n("MaxPool", ["r"], ["p"], name="/pool", kernel_shape=[2, 2], strides=[2, 2]), n("Reshape", ["p", "shape"], ["f"], name="/flatten"),
        n("MatMul", ["f", "fc/W"], ["mm"], name="/fc/MatMul"), n("Add", ["mm", "fc/B"], ["h"], name="/fc/Add"),
        n("Div", ["h", "sqrt2"], ["g1"], name="/gelu/Div"), n("Erf", ["g1"], ["g2"], name="/gelu/Erf"),
        n("Add", ["g2", "one"], ["g3"], name="/gelu/Add"), n("Mul", ["h", "g3"], ["g4"], name="/gelu/Mul"),
        n("Mul", ["g4", "half"], ["g"], name="/gelu/Mul_1"),
        n("ReduceMean", ["g"], ["m"], name="/ln/ReduceMean", axes=[-1]), n("Sub", ["g", "m"], ["d"], name="/ln/Sub"),
        n("Pow", ["d", "two"], ["sq"], name="/ln/Pow"), n("ReduceMean", ["sq"], ["v"], name="/ln/ReduceMean_1", axes=[-1]),
        n("Add", ["v", "eps"], ["ve"], name="/ln/Add"), n("Sqrt", ["ve"], ["s"], name="/ln/Sqrt"),
        n("Div", ["d", "s"], ["nrm"], name="/ln/Div"), n("Mul", ["nrm", "ln/g"], ["sc"], name="/ln/Mul"),
        n("Add", ["sc", "ln/b"], ["y"], name="/ln/Add_1"),
    ]
    graph = helper.make_graph(nodes, "fusions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)], ir_version=8)


def test_the_deployed_graph_maps_each_fused_kernel_to_its_original_nodes():
    graph = ModelGraph(_fusion_model())
    runner = make_runner(graph, "ort:cpu:fp32@graph_optimization_level=extended")
    deployed = map_deployed(graph, kernels_of_onnx(runner.optimized_model()), "ort:cpu:fp32")
    fused = {k.op_type.split("::")[-1]: set(k.originals) for k in deployed.fused}
    assert fused["FusedConv"] == {"/conv/Conv", "/conv/Relu"}
    assert fused["Gemm"] == {"/fc/MatMul", "/fc/Add"}
    assert fused["Gelu"] == {"/gelu/Div", "/gelu/Erf", "/gelu/Add", "/gelu/Mul", "/gelu/Mul_1"}
    assert len(fused["LayerNormalization"]) == 9 and "/ln/Pow" in fused["LayerNormalization"]
    assert "sq" not in deployed.boundaries and "y" in deployed.boundaries  # the square exists only inside the kernel


@pytest.fixture(scope="module")
def vit():
    return ModelGraph(tiny_vit()), example_inputs()


def test_capture_inside_a_fusion_is_labelled_not_blamed(vit):
    graph, feeds = vit
    unfused = compare(graph, target="emu:fp16", feeds=feeds)  # a runtime that does not fuse: the Pow overflows
    assert unfused.first_divergent.node == "/blocks.0/norm1/Pow" and unfused.first_divergent.new_nonfinite
    deployed = compare(graph, target="emu:fp16@fusions=ort", feeds=feeds)  # what a fusing runtime deploys
    assert deployed.capture == "boundaries" and deployed.first_divergent is None and not deployed.perturbed
    assert any("/blocks.0/norm1/Pow" in k.originals for k in deployed.kernels)
    assert "/blocks.0/norm1/Pow_output_0" in deployed.absorbed
    # and the user learns what the safety depends on, before switching runtime or version
    assert any(n.startswith("safe only because of a fusion") and "LayerNormalization" in n and "/blocks.0/norm1/Pow" in n
               for n in deployed.notes)
    probed = compare(graph, target="emu:fp16@fusions=ort,capture=all", feeds=feeds)  # capturing everything unfuses
    assert probed.first_divergent is None, probed.verdict()  # never the target's divergence...
    assert probed.perturbed and any(t.tensor == "/blocks.0/norm1/Pow_output_0" and t.diverges for t in probed.perturbed)
    assert "labelled, not blamed" in probed.verdict()  # ...but said, with what it would compute unfused


@pytest.mark.parametrize("strategy", ["all", "frontier", "isolate"])
def test_bisect_agrees_on_the_deployed_graph(vit, strategy):
    graph, feeds = vit
    result = bisect(graph, target="emu:fp16@fusions=ort", feeds=feeds, strategy=strategy)
    assert not result.diverged and result.failed == ""
    assert not any(p.perturbed for p in result.probes)


def test_a_fault_inside_a_fused_kernel_is_localised_to_that_kernel(vit, tmp_path):
    graph, feeds = vit
    edited = onnx.ModelProto()
    edited.CopyFrom(graph.model)
    gamma = next(t for t in edited.graph.initializer if t.name == "/blocks.1/norm2.weight")
    gamma.CopyFrom(nh.from_array(nh.to_array(gamma) * 1.5, gamma.name))
    result = compare(graph, target="emu:fp16@fusions=ort", target_model=ModelGraph(edited), feeds=feeds)
    first = result.first_divergent
    kernel = next(k for k in result.kernels if k.name == first.kernel)
    assert kernel.op_type == "LayerNormalization" and "/blocks.1/norm2/Mul" in kernel.originals
    assert "fused kernel LayerNormalization" in result.verdict()


def test_a_plan_that_is_safe_only_because_of_a_fusion_says_which(vit):
    """The issue's case on CPU: on the fusing runtime the FP16 plan is empty; a runtime that does
    not fuse the final LayerNorm needs FP32 pins there, and the empty plan says so and which fusion."""
    graph, feeds = vit
    fused = search_precision(graph, target="emu:fp16@fusions=ort", samples=[feeds])
    plain = search_precision(graph, target="emu:fp16", samples=[feeds])
    assert fused.passed and fused.pins == () and plain.passed and plain.pins and not plain.fusion_dependence
    said = fused.fusion_dependence
    assert said.startswith("safe only because of a fusion") and fused.to_dict()["fusion_dependence"] == said
    assert all(p.node in said for p in plain.pins)  # the pins a non-fusing runtime needs, by name
    kernel = next(k for k in make_runner(graph, "emu:fp16@fusions=ort").optimized_model().graph.node
                  if plain.pins[0].node in said and k.name in said)
    assert "LayerNorm" in kernel.op_type  # the fusion named is the normalization kernel holding those pins


def _trt_layer_information(graph: ModelGraph) -> dict:
    """What TensorRT's engine inspector writes for the fusion model (ProfilingVerbosity.DETAILED,
    LayerInformationFormat.JSON): a fused conv+relu, a pooling layer whose metadata is empty, a
    reformat layer, and a Myelin region swallowing the rest (separators vary between versions)."""
    tail = [n.name for n in graph.nodes][3:]
    tensor = lambda name: {"Name": name, "Location": "Device", "Dimensions": [1], "Format/Datatype": "Half"}  # noqa: E731
    return {"Layers": [
        {"Name": "/conv/Conv + /conv/Relu", "LayerType": "CaskConvolution", "Inputs": [tensor("x")], "Outputs": [tensor("r")],
         "Metadata": "[ONNX Layer: /conv/Conv]\x1f[ONNX Layer: /conv/Relu]", "TacticName": "sm90_xmma_fprop"},
        {"Name": "/pool", "LayerType": "CaskPooling", "Inputs": [tensor("r")], "Outputs": [tensor("p")], "Metadata": ""},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to {ForeignNode[/flatten.../ln/Add_1]}", "LayerType": "Reformat",
         "Inputs": [tensor("p")], "Outputs": [tensor("Reformatted Input Tensor 0 to {ForeignNode[/flatten.../ln/Add_1]}")]},
        {"Name": "{ForeignNode[/flatten.../ln/Add_1]}", "LayerType": "Myelin", "Inputs": [tensor("p")], "Outputs": [tensor("y")],
         "Metadata": "\x1e".join(f"[ONNX Layer: {n}]" for n in tail)},
    ], "Bindings": ["x", "y"]}


def test_tensorrt_layer_information_maps_layers_to_their_onnx_nodes():
    from aligner.errors import InputError
    from aligner.graph.deployed import kernels_of_trt

    graph = ModelGraph(_fusion_model())
    info = _trt_layer_information(graph)
    deployed = map_deployed(graph, kernels_of_trt(json.dumps(info)), "trt:fp16")
    fused = {k.name: k for k in deployed.fused}
    assert set(fused["/conv/Conv + /conv/Relu"].originals) == {"/conv/Conv", "/conv/Relu"}
    myelin = fused["{ForeignNode[/flatten.../ln/Add_1]}"]
    assert myelin.originals[0] == "/flatten" and "/ln/Pow" in myelin.originals and len(myelin.originals) == 17
    assert deployed.kernel_of["/pool"] == "/pool"  # no metadata: the tensor it writes decides
    assert {"r", "p", "y"} <= deployed.boundaries and "sq" not in deployed.boundaries and "h" not in deployed.boundaries
    # an engine built without detailed verbosity lists bare names: a clear error, not a wrong map
    with pytest.raises(InputError, match="ProfilingVerbosity.DETAILED"):
        kernels_of_trt({"Layers": ["/conv/Conv + /conv/Relu", "/pool"]})
    with pytest.raises(InputError, match="not JSON"):
        kernels_of_trt("{Layers")
    # Myelin metadata written as one bracket per node after a single prefix
    merged = kernels_of_trt({"Layers": [{"Name": "mha", "LayerType": "kgen", "Outputs": [],
                                          "Metadata": "[ONNX Layer: /a/Softmax][/a/MatMul][/a/MatMul_1]"}]})
    assert merged[0][3] == ["/a/Softmax", "/a/MatMul", "/a/MatMul_1"]


def test_the_noise_run_is_made_only_when_a_capture_moved_the_outputs():
    """One uncaptured run when captures change nothing; the second (the noise) only to judge a move
    that could change a verdict, and a move within the noise is not a perturbation."""
    from aligner.compare.capture import CaptureCheck
    from aligner.compare.tolerance import Tolerance

    tol = Tolerance("rel_l2", 1e-4, 1e-5)
    base = {"y": np.linspace(-1, 1, 64, dtype=np.float32)}
    second_runs = []

    def second(shift=0.0):
        second_runs.append(1)
        return {"y": base["y"] + np.float32(shift)}

    check = CaptureCheck(base, second)
    assert not check.moved({"y": base["y"].copy()}, tol) and second_runs == []
    assert not check.moved({"y": base["y"] + np.float32(2e-7)}, tol) and second_runs == []  # FP32 rounding: within a tenth of the tolerance
    moved = check.moved({"y": base["y"] + np.float32(1e-3)}, tol)
    assert "moved by rel_l2" in moved.why and moved.effect == pytest.approx(1e-3 / np.sqrt(np.mean(base["y"] ** 2)), rel=1e-3)
    assert len(second_runs) == 1
    noisy = CaptureCheck(base, lambda: second(1e-3))
    assert not noisy.moved({"y": base["y"] + np.float32(2e-3)}, tol)  # within 4x the run-to-run noise


def test_a_capture_explains_only_divergences_of_its_own_size():
    """A capture that moved the outputs by rel_l2 1e-3 can explain a tensor at 5e-3, not one at 0.05;
    NaN/inf only when it moved the outputs beyond the tolerance."""
    from aligner.compare.capture import Perturbation

    small = Perturbation("moved", 1e-3, beyond_tolerance=False)
    assert small.explains({"rel_l2": 5e-3}, "metric") and not small.explains({"rel_l2": 0.05}, "metric")
    assert not small.explains({"rel_l2": float("nan")}, "nonfinite")
    assert Perturbation("NaN", float("inf"), True).explains({"rel_l2": 0.5}, "metric")
    assert not Perturbation().explains({"rel_l2": 1e-3}, "metric")


def test_the_report_lists_each_fused_kernel_with_its_nodes_and_the_perturbed_captures(vit, tmp_path):
    import subprocess

    from aligner.report import write_report

    graph, feeds = vit
    model = tmp_path / "vit.onnx"
    onnx.save(graph.model, model)
    np.savez(tmp_path / "inputs.npz", **feeds)
    runs = []
    for name, spec in [("boundaries", "emu:fp16@fusions=ort"), ("all", "emu:fp16@fusions=ort,capture=all")]:
        run = subprocess.run(["aligner", "compare", str(model), "--target", spec, "--inputs", str(tmp_path / "inputs.npz"),
                              "--run", str(tmp_path / name)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        runs.append(tmp_path / name)
    html = write_report(runs, tmp_path / "report.html").read_text()
    boundaries, everything = html.split("Layer-by-layer compare")[1:3]
    assert "Fused kernels of the deployed graph" in boundaries and "fused-kernel boundary" in boundaries
    table = boundaries.split("Fused kernels of the deployed graph")[1]
    assert "LayerNormalization" in table and "/blocks.0/norm1/Pow" in table  # the kernel and its original nodes
    assert "were not captured" in boundaries and "perturbed, not blamed" not in boundaries
    assert "perturbed, not blamed" in everything and "capture perturbed (not blamed)" in everything  # text and chart


def test_the_uncaptured_run_in_the_background_gives_the_same_outputs_and_its_error(vit):
    """Segments start while the uncaptured run computes in the sandbox: its outputs are the ones a
    foreground run gives, and a runtime failure in it surfaces when they are needed."""
    from aligner.compare.capture import capture_check
    from aligner.errors import TargetRunError

    graph, feeds = vit
    runner = make_runner(graph, "ort:cpu:fp32")
    later, now = capture_check(runner, feeds, background=True), capture_check(runner, feeds)
    assert set(later.baseline) == set(now.baseline)
    assert all(np.array_equal(later.baseline[k], now.baseline[k]) for k in now.baseline)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    bad = helper.make_model(helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="/reshape")], "bad", [x],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                              [nh.from_array(np.array([4, 4], np.int64), "shape")]),
                            opset_imports=[helper.make_opsetid("", 16)], ir_version=8)
    failing = capture_check(make_runner(ModelGraph(bad), "ort:cpu:fp32"), {"x": np.zeros(5, np.float32)}, background=True)
    with pytest.raises(TargetRunError, match="Reshape|reshape"):
        failing.baseline
