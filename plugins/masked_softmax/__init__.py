"""MaskedSoftmax: the additive-mask softmax of DETR-style attention, in one op.

The exporters write ``Softmax(Add(scores, Where(keep, 0, -3.4e38)))``. In FP16 the constant
becomes -inf, a fully masked row turns into NaN, the ``Where`` has no INT8 kernel, and
TensorRT's fused attention block may compute it in reduced precision. The plugin reads the
boolean mask directly and computes in FP32 whatever the storage type: ``fill`` is applied in
FP32 (clamped to -FLT_MAX), so a fully masked row is uniform exactly as in the FP32 original.
"""

from aligner.plugin import Port, PluginSpec
from aligner_plugins.masked_softmax.reference import FLT_MIN, masked_softmax


def _shape(shapes, attrs):
    return [shapes[0]]


SPEC = PluginSpec(
    name="MaskedSoftmax",
    doc=__doc__,
    inputs=(Port("scores", "T", "attention logits [..., N]"),
            Port("keep", "tensor(bool)", "True where attended; broadcast to scores")),
    outputs=(Port("probs", "T", "softmax over `axis`, the shape of scores"),),
    attributes={"axis": -1, "fill": FLT_MIN},
    shape=_shape,
    reference=masked_softmax,
    kernel="aligner_plugins.masked_softmax.kernel:launch",
    fusion="masked-softmax",
    replaces="Softmax(Add(scores, Where(mask, 0, -big)))",
)
