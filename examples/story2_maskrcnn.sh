#!/usr/bin/env bash
# Story 2 (issue 19): Mask R-CNN -> ONNX: where do PyTorch and ONNX Runtime part (a TopK/NMS index
# flip is reported as `discrete`, not blamed on the heads after it), then FP16: aligner's node-level
# plan against the seed's op-type pinning (Concat, Add / Concat, Conv, Add, Sub, Mul, Exp, Sqrt, Log).
#
#   bash examples/story2_maskrcnn.sh                         # CPU: the stand-in two-stage head (no torchvision)
#   DEVICE=cuda STANDIN= bash examples/story2_maskrcnn.sh    # the GPU machine: torchvision's Mask R-CNN (random weights)
#   (the FP16 stages alone, ~4 min on the H200: python benchmarks/story2_maskrcnn.py --out OUT --skip-torch-compare
#    --skip-fp16-compare --no-fusion-check --max-trials 8 --bench-options cudnn_conv_algo_search=HEURISTIC)
#
# The library calls it makes, for your own model:
#   from aligner.compare.torch_compare import compare_torch
#   result = compare_torch(model, [image], onnx="maskrcnn.onnx", target="ort:cuda:fp32")
#   print(result.verdict()); result.root_cause.kind   # "discrete" at the TopK/NMS, or "local"
#   aligner precision maskrcnn.onnx --target ort:cuda:fp16 --inputs image.npz --out plan.json
#   aligner bench maskrcnn.onnx --target ort:cuda:fp32,ort:cuda:fp16+plan --plan plan.json
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
STANDIN=${STANDIN---standin}
OUT=${OUT:-story2-out}
python benchmarks/story2_maskrcnn.py --device "$DEVICE" $STANDIN --out "$OUT"
echo "table: $OUT/story2.md  report: $OUT/story2.html"
