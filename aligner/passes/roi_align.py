"""Replace ONNX ``RoiAlign`` and mmcv's ``MMCVRoiAlign`` with the ``aligner::RoIAlign`` plugin op.

Two-stage detectors (Faster/Mask R-CNN) export torchvision's ``roi_align`` as ONNX ``RoiAlign``
(opset 16 ``half_pixel`` for ``aligned=True``; opset 10 has only the unaligned form), and mmdet
through mmcv as ``mmcv::MMCVRoiAlign`` (boxes ``[R, 5]`` with the image index first), which ONNX
Runtime cannot run without mmcv's custom-op library. TensorRT builds that lack the RoiAlign
importer or its plugin library (TensorRT-RTX ships none) need a plugin of their own, and the
plugin keeps the boxes in FP32 in an FP16 engine. ONNX ``RoiAlign`` is converted in ``avg`` mode
only: ONNX Runtime's ``max`` mode takes the maximum of weighted corners, which no other
implementation does, so the converted model would not compare clean against it. mmcv's ``max``
(the maximum of the bilinear samples) is the plugin's own and is converted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.graph.model import ModelGraph
from aligner.passes.layernorm import FuseResult, raise_opset, rebuild
from aligner.plugin import DOMAIN, get


def _attr(node: onnx.NodeProto, name: str, default):
    a = next((a for a in node.attribute if a.name == name), None)
    if a is None:
        return default
    value = onnx.helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value


def fuse_roi_align(graph: ModelGraph) -> FuseResult:
    spec = get("RoIAlign")
    replaced, fused, skipped = {}, [], []
    for node in [n for n in graph.nodes if n.op_type == "RoiAlign" and n.domain in ("", "ai.onnx")]:
        mode = _attr(node, "mode", "avg")
        if mode != "avg":
            skipped.append(f"{node.name}: mode {mode!r} (ONNX Runtime's max mode differs from every other implementation)")
            continue
        transform = _attr(node, "coordinate_transformation_mode", "half_pixel" if graph.opset >= 16 else "output_half_pixel")
        new = spec.make_node(list(node.input), list(node.output), name=f"{node.name}/aligner_RoIAlign",
                             output_height=int(_attr(node, "output_height", 1)), output_width=int(_attr(node, "output_width", 1)),
                             sampling_ratio=int(_attr(node, "sampling_ratio", 0)), spatial_scale=float(_attr(node, "spatial_scale", 1.0)),
                             mode="avg", aligned=int(transform == "half_pixel"))
        replaced[node.name] = ([new], ())
        fused.append(node.name)
    for node in [n for n in graph.nodes if n.op_type == "MMCVRoiAlign" and n.domain in ("mmcv", "mmdeploy")]:
        replaced[node.name] = _from_mmcv(spec, node)
        fused.append(node.name)
    model = rebuild(graph, replaced, set())
    if fused:
        raise_opset(model, spec.version, DOMAIN)
    return FuseResult(model, tuple(fused), tuple(skipped))


def _from_mmcv(spec, node: onnx.NodeProto):
    """Boxes [R, 5] (image, x1, y1, x2, y2) -> boxes [R, 4] + int64 image indices, then the plugin."""
    base = f"{node.name}/aligner"
    rois = node.input[1]
    consts = [numpy_helper.from_array(np.array(v, np.int64), f"{base}/{k}") for k, v in
              (("starts", [1]), ("ends", [5]), ("axes", [1]), ("zero", 0))]
    nodes = [helper.make_node("Slice", [rois, f"{base}/starts", f"{base}/ends", f"{base}/axes"], [f"{base}/boxes"], name=f"{base}/boxes"),
             helper.make_node("Gather", [rois, f"{base}/zero"], [f"{base}/image_f"], name=f"{base}/image", axis=1),
             helper.make_node("Cast", [f"{base}/image_f"], [f"{base}/image"], name=f"{base}/image_int64", to=TensorProto.INT64),
             spec.make_node([node.input[0], f"{base}/boxes", f"{base}/image"], list(node.output), name=f"{base}_RoIAlign",
                            output_height=int(_attr(node, "output_height", 1)), output_width=int(_attr(node, "output_width", 1)),
                            sampling_ratio=int(_attr(node, "sampling_ratio", 0)), spatial_scale=float(_attr(node, "spatial_scale", 1.0)),
                            mode=str(_attr(node, "mode", "avg")), aligned=int(_attr(node, "aligned", 1)))]
    return nodes, tuple(consts)


__all__ = ["fuse_roi_align"]
