"""INT8 at real sizes (issue 28): calibration streams sample by sample (memory flat in the number of
samples, ranges equal to ONNX Runtime's own calibrators'), and models below opset 13 quantize."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import make_runner, reference_runner
from aligner.backends.target import Target
from aligner.compare.metrics import rel_l2
from aligner.graph.model import ModelGraph
from aligner.quant.calib import reporting
from aligner.quant.quantize import calibrate_ranges, quantize
from aligner.quant.ranges import calibrate


def conv_net(size: int = 32, channels: int = 8, layers: int = 4, opset: int = 17, outlier_channel: bool = False,
             seed: int = 0) -> onnx.ModelProto:
    """Conv+Relu x ``layers`` then a Conv head, at 1x3x``size``x``size``. ``outlier_channel``: the first
    conv's output channel 0 has weights x100 (one weight scale for all channels would crush the others)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, ci = [], [], "x", 3
    for i in range(layers + 1):
        co = 4 if i == layers else channels
        w = rng.normal(0, (2 / (ci * 9)) ** 0.5, (co, ci, 3, 3)).astype(np.float32)
        if outlier_channel and i == 0:
            w[0] *= 100
        inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(rng.normal(0, 0.1, co).astype(np.float32), f"conv{i}.b")]
        out = "y" if i == layers else f"c{i}"
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w", f"conv{i}.b"], [out], name=f"conv{i}", pads=[1] * 4))
        if i < layers:
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            x, ci = f"a{i}", co
    graph = helper.make_graph(nodes, "conv_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 13 else 8
    return model


def _image(seed: int, size: int = 32) -> dict:
    return {"x": np.random.default_rng(seed).normal(size=(1, 3, size, size)).astype(np.float32)}


def _calib_dir(root: Path, count: int, size: int = 32) -> Path:
    folder = root / f"calib{count}_{size}"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        np.savez(folder / f"{i:04d}.npz", **_image(100 + i, size))
    return folder


def test_streamed_ranges_equal_onnxruntime_calibrators_all_at_once(tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    path = tmp_path / "m.onnx"
    onnx.save(conv_net(outlier_channel=True), str(path))
    samples = [_image(100 + i) for i in range(6)]
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    ours = calibrate(path, samples, list(methods))  # one shared pass for the three methods
    grouped = calibrate(path, samples, list(methods), budget_mb=0.001)  # one tensor per session: "larger than memory"
    alone = calibrate(path, samples, ["minmax"])  # ONNX Runtime's MinMaxCalibrater, collect_data per sample
    for name, method in methods.items():
        class Reader:  # every sample at once, as quantize_static calibrates
            def __init__(self):
                self.it = iter(samples)

            def get_next(self):
                return next(self.it, None)

        calibrator = create_calibrator(path, None, str(tmp_path / f"{name}.onnx"), calibrate_method=method, extra_options={})
        calibrator.collect_data(Reader())
        theirs = calibrator.compute_data()
        for result in (ours[name], grouped[name], *([alone[name]] if name == "minmax" else [])):
            assert set(result.keys()) == set(theirs.keys()) and len(theirs.keys()) == 10
            for tensor in theirs.keys():
                np.testing.assert_allclose(np.asarray(result[tensor].range_value, dtype=np.float64).ravel(),
                                           np.asarray(theirs[tensor].range_value, dtype=np.float64).ravel(), rtol=1e-6, atol=0,
                                           err_msg=f"{name} {tensor}")


MEASURE = textwrap.dedent("""
    import json, resource, sys
    from aligner.graph.model import ModelGraph
    from aligner.quant.calib import load_calibration
    from aligner.quant.ranges import calibrate
    graph = ModelGraph.load(sys.argv[1])
    calibration = load_calibration(graph, sys.argv[2])
    calibrate(sys.argv[1], calibration.samples, ["minmax", "entropy", "percentile"])
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def test_calibration_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    size, channels = 160, 16  # one sample's calibrated tensors: 9 x 16x160x160 floats, about 15 MB
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(size, channels), str(path))
    peaks = {}
    for count in (4, 32):
        folder = _calib_dir(tmp_path, count, size)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(folder)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    per_sample_mb = 9 * channels * size * size * 4 / 2**20
    # Keeping every sample's tensors (ONNX Runtime's histogram calibrators) would add 28 samples' worth: about 400 MB;
    # streaming adds about 20 MB here (the allocator's), under a fifth of that.
    assert peaks[32] - peaks[4] < 0.2 * 28 * per_sample_mb, peaks


def test_calibration_reports_progress_and_is_computed_once_for_every_method(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(), str(path))
    graph = ModelGraph.load(path)
    target = Target.parse(f"ort:cpu:int8@calib={_calib_dir(tmp_path, 5)}")
    seen = []
    with reporting(lambda phase, done, total: seen.append((phase, done, total))):
        files = calibrate_ranges(graph, target, ("minmax", "entropy", "percentile"))
        again = calibrate_ranges(graph, target.with_options({"calibrate": "entropy"}), ("entropy",))  # cached: no pass
    assert again["entropy"] == files["entropy"] and all(f.exists() for f in files.values())
    assert [d for _, d, _ in seen] == list(range(1, 11)) and {t for _, _, t in seen} == {10}  # 2 passes x 5 samples, once
    assert seen[0][0] == "calibrating minmax, entropy, percentile (pass 1 of 2: value ranges)"
    assert seen[-1][0] == "calibrating minmax, entropy, percentile (pass 2 of 2: histograms)"


def _opset11_case(tmp_path: Path, seed: int = 0) -> tuple[ModelGraph, Target]:
    path = tmp_path / "opset11.onnx"
    onnx.save(conv_net(outlier_channel=True, opset=11, seed=seed), str(path))  # another seed: another model (the opset decision is cached per model)
    return ModelGraph.load(path), Target.parse(f"emu:int8@calib={_calib_dir(tmp_path, 4)}")


def test_opset11_model_is_upgraded_and_quantized_per_channel(tmp_path):
    graph, target = _opset11_case(tmp_path)
    quantized = quantize(graph, target, exclude=())
    opset = next(o.version for o in quantized.model.opset_import if o.domain in ("", "ai.onnx"))
    weight_scale = next(numpy_helper.to_array(i) for i in quantized.model.graph.initializer if i.name == "conv0.w_scale")
    assert opset >= 13 and weight_scale.shape == (8,)  # one scale per output channel
    assert "upgraded to opset 13" in quantized.opset_note and quantized.to_dict()["opset"] == quantized.opset_note
    feeds = _image(7)
    expected = reference_runner(graph).run(feeds)["y"]
    for spec in ("emu:int8", "ort:cpu:int8@reduce_range=1"):  # Q/DQ in float; ONNX Runtime's integer kernels
        got = make_runner(graph, Target.parse(spec).with_options({"calib": target.option_dict["calib"]})).run(feeds)["y"]
        assert np.isfinite(got).all() and rel_l2(expected, got) < 0.1, spec


def test_opset11_model_falls_back_to_per_tensor_when_the_upgrade_fails(tmp_path, monkeypatch):
    from onnx import version_converter

    def refuse(model, version):
        raise RuntimeError("no adapter for this op")  # simulated: the converter has no adapter for some op

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    graph, target = _opset11_case(tmp_path, seed=1)
    quantized = quantize(graph, target, exclude=())
    opset = next(o.version for o in quantized.model.opset_import if o.domain in ("", "ai.onnx"))
    weight_scale = next(numpy_helper.to_array(i) for i in quantized.model.graph.initializer if i.name == "conv0.w_scale")
    assert opset == 11 and weight_scale.size == 1
    assert "quantized per-tensor" in quantized.opset_note and "no adapter" in quantized.opset_note
    got = make_runner(graph, target).run(_image(7))["y"]  # runs: no raw INVALID_GRAPH
    assert np.isfinite(got).all()


def test_isolation_groups_units_by_their_real_tensor_sizes_within_the_budget(tmp_path):
    """Isolating the quantized nodes holds at most the budget of tensors per run (their sizes from
    shape inference, not a fixed guess per node); smaller budgets give more runs, the same errors."""
    from aligner.compare.tolerance import tolerance_for
    from aligner.quant.match import QdqMap
    from aligner.search.isolate import isolate_quantized, unit_bytes

    size = 96
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(size, channels=16, layers=4), str(path))
    graph = ModelGraph.load(path)
    target = Target.parse(f"ort:cpu:int8@reduce_range=1,calib={_calib_dir(tmp_path, 2, size)}")
    feeds = _image(3, size)
    qmap = QdqMap(graph, quantize(graph, target).model)
    units = {n: u for n in ("conv1", "conv2", "conv3") if (u := qmap.unit(n)) is not None}
    activation = 16 * size * size * 4
    assert unit_bytes(graph, units, feeds) == {n: activation + 3 * activation for n in units}  # its input; its output x (reference + 2 runs)
    names = [f"conv{i}" for i in range(5)]
    results = {}
    for budget in (2**30, 2 * 4 * activation):  # everything in one run; two middle units a run
        probes = []
        errors = isolate_quantized(graph, names, feeds, reference_runner(graph), target, tolerance_for(target), budget_bytes=budget,
                                   on_probe=probes.append)
        results[budget] = ({e.node: e.metrics["rel_l2"] for e in errors}, len(probes))
    (big, big_runs), (small, small_runs) = results.values()
    assert big_runs == 1 and small_runs == 3  # conv0 (3-channel input) + conv1, conv2 + conv3, conv4
    assert small.keys() == big.keys() == set(names)
    for node in names:
        np.testing.assert_allclose(small[node], big[node], rtol=1e-5, err_msg=node)


def test_weights_in_constant_nodes_are_said_and_the_sweep_skips_reduce_range(tmp_path):
    """PaddlePaddle's exporter writes weights as Constant nodes (PP-OCRv4 det: all 62 Conv weights); ONNX
    Runtime's quantizer then calibrates them as activations and per_channel/reduce_range do nothing: the
    plan says so and the sweep does not spend trials on reduce_range."""
    from aligner.compare.tolerance import tolerance_for
    from aligner.search.int8 import constant_weights, quantizer_settings

    model = conv_net(layers=2, seed=3)
    for init in [i for i in model.graph.initializer if i.name.endswith(".w")]:
        model.graph.node.insert(0, helper.make_node("Constant", [], [init.name], name=f"const_{init.name}", value=init))
        model.graph.initializer.remove(init)
    path = tmp_path / "constants.onnx"
    onnx.save(model, str(path))
    graph = ModelGraph.load(path)
    assert constant_weights(graph) == ["conv0.w", "conv1.w", "conv2.w"]
    target = Target.parse(f"ort:cpu:int8@calib={_calib_dir(tmp_path, 2)}")
    _, record = quantizer_settings(graph, target, [_image(5)], tolerance_for(target), sweep=True)
    assert "3 Conv/MatMul/Gemm weight(s) are Constant nodes' outputs" in record["weights"]
    assert len(record["sweep"]) == 3 and len({p["options"]["reduce_range"] for p in record["sweep"]}) == 1
    assert constant_weights(ModelGraph(conv_net())) == []
