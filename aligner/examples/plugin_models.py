"""Small graphs with aligner's plugin ops (and the standard ops they replace), with inputs: the
plugin tests' and benchmarks' models, built in code."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.plugin import DOMAIN, get


def roi_model(x_type=TensorProto.FLOAT, opset=16, mode="avg", ctm="half_pixel", sampling=0, plugin=False, mmcv=False):
    """Conv feature map -> RoiAlign (standard, or the plugin) -> ReduceMean: a detector's box head."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["feat"], name="backbone/Conv", pads=[1, 1, 1, 1], strides=[2, 2])]
    attrs = dict(output_height=7, output_width=7, sampling_ratio=sampling, spatial_scale=0.5)
    if plugin:
        nodes.append(get("RoIAlign").make_node(["feat", "rois", "batch_indices"], ["pooled"], name="head/RoIAlign", mode=mode, aligned=1, **attrs))
    elif mmcv:  # mmdet's export: boxes [R, 5] with the image index first, domain mmcv
        nodes.insert(0, helper.make_node("Cast", ["batch_indices"], ["image_f"], name="rois/Cast", to=TensorProto.FLOAT))
        nodes.insert(1, helper.make_node("Unsqueeze", ["image_f", "one"], ["image_col"], name="rois/Unsqueeze"))
        nodes.insert(2, helper.make_node("Concat", ["image_col", "rois"], ["rois5"], name="rois/Concat", axis=1))
        nodes.append(helper.make_node("MMCVRoiAlign", ["feat", "rois5"], ["pooled"], name="head/MMCVRoiAlign", domain="mmcv",
                                      mode=mode, aligned=1, **attrs))
    else:
        extra = {"coordinate_transformation_mode": ctm} if opset >= 16 else {}
        nodes.append(helper.make_node("RoiAlign", ["feat", "rois", "batch_indices"], ["pooled"], name="head/RoiAlign", mode=mode, **attrs, **extra))
    nodes.append(helper.make_node("ReduceMean", ["pooled"], ["score"], name="head/ReduceMean", axes=[2, 3], keepdims=0))
    graph = helper.make_graph(nodes, "boxhead", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3, 40, 48]),
                                                   helper.make_tensor_value_info("rois", TensorProto.FLOAT, [5, 4]),
                                                   helper.make_tensor_value_info("batch_indices", TensorProto.INT64, [5])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [5, 8])],
                              [w, numpy_helper.from_array(np.array([1], np.int64), "one")])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(DOMAIN, 1)] if plugin else []) + ([helper.make_opsetid("mmcv", 1)] if mmcv else [])
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


ROIS = np.array([[1, 2, 30, 25], [0, 0, 47, 39], [5.5, 3.2, 6.1, 4.0], [-6, -4, 60, 50], [40, 30, 80, 80]], np.float32)
ROI_FEEDS = {"image": np.random.default_rng(1).normal(size=(2, 3, 40, 48)).astype(np.float32), "rois": ROIS,
             "batch_indices": np.array([0, 1, 1, 0, 1], np.int64)}


def masked_attention(scale: float = 1.0, positive: bool = False) -> onnx.ModelProto:
    """Two stacked masked attentions written with the plugin op: x -> (x Wq)(x Wk)^T -> MaskedSoftmax -> @ x."""
    rng = np.random.default_rng(0)
    inits, nodes, h = [], [], "x"
    for i in range(2):
        wq, wk = rng.normal(size=(16, 16)) * 0.1 * scale, rng.normal(size=(16, 16)) * 0.1
        if positive:  # every score positive: the largest of each row overflows first
            wq, wk = np.abs(wq), np.abs(wk)
        wq, wk = numpy_helper.from_array(wq.astype(np.float32), f"wq{i}"), numpy_helper.from_array(wk.astype(np.float32), f"wk{i}")
        inits += [wq, wk]
        nodes += [helper.make_node("MatMul", [h, f"wq{i}"], [f"q{i}"], name=f"l{i}/q"),
                  helper.make_node("MatMul", [h, f"wk{i}"], [f"k{i}"], name=f"l{i}/k"),
                  helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], name=f"l{i}/kt", perm=[0, 2, 1]),
                  helper.make_node("MatMul", [f"q{i}", f"kt{i}"], [f"s{i}"], name=f"l{i}/scores"),
                  get("MaskedSoftmax").make_node([f"s{i}", "keep"], [f"p{i}"], name=f"l{i}/MaskedSoftmax"),
                  helper.make_node("MatMul", [f"p{i}", h], [f"h{i}"], name=f"l{i}/out")]
        h = f"h{i}"
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 16]),
                                              helper.make_tensor_value_info("keep", TensorProto.BOOL, [1, 1, 12])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 12, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)], ir_version=8)


ATTN_FEEDS = {"x": np.random.default_rng(2).normal(size=(1, 12, 16)).astype(np.float32),
              "keep": np.array([[[True] * 9 + [False] * 3]])}


__all__ = ["ATTN_FEEDS", "ROIS", "ROI_FEEDS", "masked_attention", "roi_model"]
