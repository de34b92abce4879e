"""RoIAlign: the two-stage detector's region feature pooling (Mask R-CNN, Faster R-CNN).

Semantics of torchvision's ``roi_align`` and mmcv's ``MMCVRoiAlign`` (``aligned=1`` is ONNX
RoiAlign's ``half_pixel``), ``avg`` or ``max`` over the bilinear samples of each bin. The boxes
stay FP32 whatever the precision: in FP16 a coordinate above 2048 moves by whole pixels. ONNX
Runtime's own ``max`` mode takes the maximum of weighted corners instead of samples, which is why
the pass converts ``avg`` RoiAligns only.
"""

from aligner.plugin import Port, PluginSpec
from aligner_plugins.roi_align.reference import roi_align


def _shape(shapes, attrs):
    x, rois = shapes[0], shapes[1]
    r = rois[0] if rois else None
    c = x[1] if x and len(x) == 4 else None
    return [(r, c, int(attrs["output_height"]), int(attrs["output_width"]))]


SPEC = PluginSpec(
    name="RoIAlign",
    doc=__doc__,
    inputs=(Port("X", "T", "feature map [N, C, H, W]"),
            Port("rois", "tensor(float)", "boxes [R, 4] as x1, y1, x2, y2 in input pixels (kept FP32)"),
            Port("batch_indices", "tensor(int64)", "image of each box [R]")),
    outputs=(Port("Y", "T", "[R, C, output_height, output_width]"),),
    attributes={"output_height": 1, "output_width": 1, "sampling_ratio": 0, "spatial_scale": 1.0, "mode": "avg", "aligned": 1},
    shape=_shape,
    reference=roi_align,
    kernel="aligner_plugins.roi_align.kernel:launch",
    fusion="roi-align",
    replaces="RoiAlign (ai.onnx, mode avg), mmcv::MMCVRoiAlign",
)
