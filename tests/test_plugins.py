"""Plugins: specs, reference implementations, ONNX Runtime custom ops, passes, and plugin nodes in
compare / bisect / precision like any other node."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aligner import compare
from aligner.backends import make_runner
from aligner.backends.target import Target
from aligner.cli.main import main
from aligner.graph.model import ModelGraph
from aligner.graph.precision import rewrite_precision
from aligner.passes import fuse_layernorm, fuse_masked_softmax, fuse_roi_align
from aligner.examples.plugin_models import ATTN_FEEDS, ROI_FEEDS, ROIS
from aligner.examples.plugin_models import masked_attention as _attention
from aligner.examples.plugin_models import roi_model as _roi_model
from aligner.plugin import DOMAIN, get, plugins
from aligner.search.bisect import bisect
from aligner.search.precision import search_precision

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed_including_the_plugin_folders():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "aligner").rglob("__init__.py")}
    found |= {f"aligner_plugins.{p.parent.name}" for p in (ROOT / "plugins").glob("*/__init__.py")}
    found.add("aligner_plugins")
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"MaskedSoftmax", "RoIAlign"} <= set(plugins())


# ---- specs: ONNX schema, shape inference, types -----------------------------------------------




def test_spec_gives_the_checker_and_shape_inference_the_plugin_op():
    model = _roi_model(plugin=True)
    onnx.checker.check_model(model)  # attributes and arity validated against the spec's schema
    graph = ModelGraph(model)
    pooled = graph.tensors["pooled"]
    assert pooled.elem_type == TensorProto.FLOAT and pooled.shape == (5, 8, 7, 7)  # the spec's shape rule
    bad = _roi_model(plugin=True)
    bad.graph.node[1].attribute.append(helper.make_attribute("output_size", 7))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(bad)
    fp16 = rewrite_precision(graph, precision="fp16").model
    fp16_graph = ModelGraph(fp16)
    node = fp16_graph.node("head/RoIAlign")
    assert fp16_graph.tensors[node.input[0]].elem_type == TensorProto.FLOAT16  # X follows the low type
    assert fp16_graph.tensors[node.input[1]].elem_type == TensorProto.FLOAT  # boxes stay FP32 (the spec's fixed type)
    assert fp16_graph.tensors["pooled"].elem_type == TensorProto.FLOAT16


# ---- reference implementations against independent ones ---------------------------------------

@pytest.mark.parametrize("opset,ctm,sampling", [(16, "half_pixel", 0), (16, "output_half_pixel", 0), (16, "half_pixel", 2), (10, None, 0)])
def test_roi_align_reference_matches_onnxruntime_roialign(opset, ctm, sampling):
    model = _roi_model(opset=opset, ctm=ctm, sampling=sampling)
    model.graph.node.pop()
    model.graph.output[0].CopyFrom(helper.make_empty_tensor_value_info("pooled"))
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ROI_FEEDS)[0]
    feat = ort.InferenceSession(_feat_only(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": ROI_FEEDS["image"]})[0]
    got = get("RoIAlign").run_reference(feat, ROIS, ROI_FEEDS["batch_indices"], output_height=7, output_width=7, sampling_ratio=sampling,
                                         spatial_scale=0.5, aligned=int(ctm == "half_pixel"))[0]
    assert got.shape == expected.shape == (5, 8, 7, 7)
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()  # FP32 rounding (a wrong offset is ~1e-1)


def _saved(model) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx.save(model, str(path))
    return path


def _feat_only(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[1:]
    del m.graph.input[1:]
    m.graph.output[0].CopyFrom(helper.make_empty_tensor_value_info("feat"))
    return m


def test_masked_softmax_reference_is_the_fp32_decomposed_softmax_and_never_nan():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 4, 6, 10)).astype(np.float32) * 5
    keep = rng.random((2, 1, 1, 10)) > 0.3
    keep[1, 0, 0, :] = False  # a fully masked row (every key is padding)
    spec = get("MaskedSoftmax")
    got = spec.run_reference(scores, keep)[0]
    z = scores.astype(np.float64) + np.where(keep, 0.0, np.finfo(np.float32).min)
    e = np.exp(z - z.max(-1, keepdims=True))
    assert np.abs(got - e / e.sum(-1, keepdims=True)).max() < 1e-6
    assert np.allclose(got[1], 0.1)  # fully masked: uniform, as the FP32 original gives
    with np.errstate(all="ignore"):  # the decomposed form in FP16: the constant is -inf, the row NaN
        z16 = scores.astype(np.float16) + np.where(keep, np.float16(0), np.float16(-np.inf))
        e16 = np.exp(z16 - z16.max(-1, keepdims=True))
        assert np.isnan(e16 / e16.sum(-1, keepdims=True))[1].all()
    assert np.isfinite(spec.run_reference(scores.astype(np.float16), keep)[0]).all()


# ---- the ONNX Runtime custom op, and the passes verified on ONNX Runtime ------------------------

def test_plugin_nodes_run_on_onnxruntime_through_the_reference():
    graph = ModelGraph(_roi_model(plugin=True))
    out = make_runner(graph, "ort:cpu:fp32").run(ROI_FEEDS, ["pooled", "feat"])
    expected = get("RoIAlign").run_reference(out["feat"], ROIS, ROI_FEEDS["batch_indices"], output_height=7, output_width=7, spatial_scale=0.5)[0]
    assert np.array_equal(out["pooled"], expected)
    fp16 = compare(graph, target="ort:cpu:fp16", feeds=ROI_FEEDS, tensors=["pooled", "score"])  # FP16 model: casts around the op
    assert fp16.first_divergent is None and all(0 < t.metrics["rel_l2"] < 1e-2 for t in fp16.tensors)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_pass_turns_mmcv_roialign_into_the_plugin(mode, tmp_path, capsys):
    graph = ModelGraph(_roi_model(mmcv=True, mode=mode))
    result = fuse_roi_align(graph)
    fused = ModelGraph(result.model)
    assert result.fused == ("head/MMCVRoiAlign",) and "MMCVRoiAlign" not in fused.op_histogram()
    out = make_runner(fused, "ort:cpu:fp32").run(ROI_FEEDS, ["feat", "pooled"])  # ORT could not run the mmcv original at all
    expected = get("RoIAlign").run_reference(out["feat"], ROIS, ROI_FEEDS["batch_indices"], output_height=7, output_width=7,
                                              spatial_scale=0.5, mode=mode, aligned=1)[0]
    assert np.array_equal(out["pooled"], expected)
    np.savez(tmp_path / "in.npz", **ROI_FEEDS)
    assert main(["build", str(_saved(graph.model)), "--fuse", "roi-align", "--target", "ort:cpu:fp32", "--inputs", str(tmp_path / "in.npz"),
                 "-o", str(tmp_path / "fused.onnx")]) == 0
    assert "mmcv::MMCVRoiAlign" in capsys.readouterr().out and (tmp_path / "fused.onnx").exists()  # said why it was not compared


def test_roi_align_pass_matches_the_standard_op_and_leaves_max_mode_alone():
    graph = ModelGraph(_roi_model())
    result = fuse_roi_align(graph)
    fused = ModelGraph(result.model)
    assert result.fused == ("head/RoiAlign",) and fused.op_histogram()["RoIAlign"] == 1 and "RoiAlign" not in fused.op_histogram()
    same = compare(graph, target="ort:cpu:fp32", target_model=fused, feeds=ROI_FEEDS, tensors=["pooled", "score"])
    assert same.first_divergent is None and max(t.metrics["rel_l2"] for t in same.tensors) < 1e-6
    kept = fuse_roi_align(ModelGraph(_roi_model(mode="max")))
    assert kept.fused == () and "max" in kept.skipped[0]


@pytest.fixture(scope="module")
def detr_r50(tmp_path_factory):
    """DETR-R50 (transformers' DetrConfig defaults: ResNet-50, 6+6 layers, d_model 256; random
    weights) exported by the legacy exporter at opset 16 with a padding mask, 128x160 input."""
    from conftest import export_detr_with_mask
    from transformers import DetrConfig, ResNetConfig

    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=ResNetConfig(out_features=["stage4"]))
    path, feeds = export_detr_with_mask(tmp_path_factory.mktemp("detr_r50") / "detr_r50.onnx", config, 128, 160)
    return ModelGraph.load(path), feeds


def test_detr_r50_every_layernorm_and_masked_softmax_is_fused_and_compares_clean(detr_r50):
    graph, feeds = detr_r50
    decomposed = sum(1 for n in graph.nodes if n.op_type == "Pow")
    ln = fuse_layernorm(graph)
    ms = fuse_masked_softmax(ModelGraph(ln.model))
    fused = ModelGraph(ms.model)
    hist = fused.op_histogram()
    print(f"DETR-R50: {len(ln.fused)} LayerNorms fused of {decomposed} Pow nodes; {len(ms.fused)} masked softmaxes fused; skipped {ms.skipped}")
    assert len(ln.fused) == decomposed == 6 * 2 + 6 * 3 + 1 and "Pow" not in hist and not ln.skipped  # every decomposed LayerNorm
    assert len(ms.fused) == 6 + 6 and hist["MaskedSoftmax"] == 12 and hist["Softmax"] == 6  # decoder self-attention has no mask
    same = compare(graph, target="ort:cpu:fp32", target_model=fused, feeds=feeds, tensors=graph.output_names)
    assert same.first_divergent is None, same.verdict()
    assert max(t.metrics["rel_l2"] for t in same.tensors) < 1e-5


# ---- plugin nodes in bisect, pins and precision search -------------------------------------------




def test_bisect_names_an_edited_plugin_node(tmp_path):
    model = _attention()
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    node = next(n for n in edited.graph.node if n.name == "l1/MaskedSoftmax")
    node.attribute.append(helper.make_attribute("fill", -2.0))  # a weak mask: padding leaks into attention
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    result = bisect(ModelGraph(model), target="ort:cpu:fp32", target_model=tmp_path / "edited.onnx", feeds=ATTN_FEEDS)
    assert result.root_cause.node == "l1/MaskedSoftmax" and result.root_cause.kind == "local"
    assert "'fill'" in result.root_cause.reason


def _padded_logits() -> tuple[onnx.ModelProto, dict]:
    """Logits whose padded positions hold garbage beyond FP16 (~1e5) -> bias Add -> MaskedSoftmax ->
    MatMul: the FP32 model ignores the padding; a plugin reading FP16 sees +inf there and returns NaN."""
    rng = np.random.default_rng(3)
    bias = numpy_helper.from_array(rng.normal(size=(12,)).astype(np.float32), "bias")
    values = numpy_helper.from_array(rng.normal(size=(12, 8)).astype(np.float32), "values")
    nodes = [helper.make_node("Add", ["logits", "bias"], ["s"], name="bias/Add"),
             get("MaskedSoftmax").make_node(["s", "keep"], ["p"], name="attn/MaskedSoftmax"),
             helper.make_node("MatMul", ["p", "values"], ["y"], name="attn/MatMul")]
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 12]),
                                                helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [bias, values])
    logits = rng.normal(size=(1, 4, 12)).astype(np.float32)
    logits[..., 9:] = 1e5
    feeds = {"logits": logits, "keep": ATTN_FEEDS["keep"]}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=8), feeds


def test_precision_search_pins_a_plugin_node_and_the_plan_runs_on_onnxruntime_fp16():
    model, feeds = _padded_logits()
    graph = ModelGraph(model)
    plan = search_precision(graph, samples=[feeds])
    assert plan.passed and set(plan.fp32_nodes) == {"bias/Add", "attn/MaskedSoftmax"}  # the writer and the plugin that reads it
    mixed = ModelGraph(rewrite_precision(graph, plan.fp32_nodes, "fp16").model)
    assert mixed.tensors[mixed.node("attn/MaskedSoftmax").input[0]].elem_type == TensorProto.FLOAT  # the pin keeps its input FP32
    real = compare(graph, target=Target.parse("ort:cpu:fp16", pins=plan.fp32_nodes), feeds=feeds, tensors=graph.output_names)
    assert real.first_divergent is None  # the real FP16 model with the plan, on ONNX Runtime's custom op
    pure = compare(graph, target="emu:fp16", feeds=feeds, tensors=graph.output_names)  # (ORT CPU folds its FP16 casts)
    assert pure.first_divergent is not None and pure.tensors[0].nonfinite_target.nan > 0  # without the plan: NaN


# ---- CLI ----------------------------------------------------------------------------------------

def test_plugins_cli_lists_ops_and_passes(capsys):
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "aligner::MaskedSoftmax" in out and "aligner::RoIAlign" in out and "masked-softmax" in out and "layernorm" in out
    assert main(["plugins", "show", "RoIAlign"]) == 0 and "batch_indices" in capsys.readouterr().out
    assert main(["plugins", "show", "RoiAlign"]) == 2 and "Did you mean: RoIAlign" in capsys.readouterr().err


def test_build_fuse_writes_a_verified_plugin_model_that_compare_reads(tmp_path, capsys):
    onnx.save(_roi_model(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "in.npz", **ROI_FEEDS)
    out = tmp_path / "m.fused.onnx"
    assert main(["build", str(tmp_path / "m.onnx"), "--fuse", "roi-align", "--target", "ort:cpu:fp32", "--inputs", str(tmp_path / "in.npz"),
                 "-o", str(out)]) == 0
    assert "1 pattern(s) replaced" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "m.onnx"), "--target-model", str(out), "--target", "ort:cpu:fp16",
                 "--inputs", str(tmp_path / "in.npz")]) == 0  # the fused model's plugin op runs on ORT in FP16
    assert "No divergence" in capsys.readouterr().out


def test_bench_times_a_model_with_plugin_ops():
    from aligner.bench import bench

    result = bench(ModelGraph(_attention()), ["ort:cpu:fp32", "ort:cpu:fp16"], [1], runs=3, warmup=1)
    assert [r.target for r in result.rows] == ["ort:cpu:fp32", "ort:cpu:fp16"] and all(r.latency_ms["median"] > 0 for r in result.rows)


def test_a_failing_plugin_op_is_a_target_error_not_a_crash():
    from aligner.errors import TargetRunError

    bad = dict(ROI_FEEDS, batch_indices=np.array([0, 1, 1, 0, 7], np.int64))  # image 7 of a batch of 2
    with pytest.raises(TargetRunError, match=r"RoIAlign: ValueError: batch_indices must be in \[0, 2\)"):
        make_runner(ModelGraph(_roi_model(plugin=True)), "ort:cpu:fp32").run(bad)
    assert main(["compare", str(_saved(_roi_model(plugin=True))), "--target", "emu:fp16"]) == 3  # random int64 indices: named, exit 3


def test_inspect_points_at_the_plugin_passes(detr_r50, tmp_path, capsys):
    graph, _ = detr_r50
    assert main(["inspect", str(graph.path)]) == 0
    out = capsys.readouterr().out
    assert "31 decomposed LayerNorm(s)" in out and "12 additive-mask softmax(es)" in out and "--fuse masked-softmax" in out
