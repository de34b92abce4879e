"""Graph passes that rewrite decomposed patterns into standard ops or aligner plugin ops
(each result is verified against the original on ONNX Runtime by ``aligner build --fuse``)."""

from aligner.passes.layernorm import FuseResult, fuse_layernorm
from aligner.passes.masked_softmax import fuse_masked_softmax
from aligner.passes.roi_align import fuse_roi_align

PASSES = {"layernorm": fuse_layernorm, "masked-softmax": fuse_masked_softmax, "roi-align": fuse_roi_align}
PASS_DOCS = {
    "layernorm": "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add] -> LayerNormalization (standard op, opset 17)",
    "masked-softmax": "Softmax(Add(scores, Where(mask, 0, -big))) -> aligner::MaskedSoftmax (plugin)",
    "roi-align": "RoiAlign (mode avg), mmcv::MMCVRoiAlign -> aligner::RoIAlign (plugin)",
}

__all__ = ["PASSES", "PASS_DOCS", "FuseResult", "fuse_layernorm", "fuse_masked_softmax", "fuse_roi_align"]
