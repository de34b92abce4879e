#!/usr/bin/env bash
# Story 1 (issue 19): a masked-attention DETR-family detector, step by step, with the seeds' table
# (step / latency at batch 1 and 8 / throughput / COCO AP, and the emulator's prediction per row).
#
#   bash examples/story1_masked_detr.sh                 # CPU: the whole pipeline with tiny settings (~3 min)
#   DEVICE=cuda QUICK= bash examples/story1_masked_detr.sh   # the GPU machine: the real table (~6 min with
#       training; the MaskedSoftmax rows run a Python custom op: pass --runs 10 --tune-rounds 2 --tune-runs 3
#       to benchmarks/story1.py to keep it near 6 min)
#
# It trains aligner/examples/masked_detr.py on padded batches of the synthetic shapes (fixed seed),
# exports it as the seeds' users do (opset 16: decomposed LayerNorm, Softmax(Add(scores,
# Where(mask, min, 0)))), then runs these aligner commands (printed again, numbered, under the table):
#
#   aligner compare  masked_detr.onnx --target ort:cuda:fp16 --inputs calib.npz        # where does pure FP16 depart?
#   aligner build    masked_detr.onnx --fuse masked-softmax --target ort:cuda:fp32 -o ms.onnx --inputs calib.npz
#   aligner build    masked_detr.onnx --fuse masked-softmax,layernorm --target ort:cuda:fp32 -o ms_ln.onnx --inputs calib.npz
#   aligner precision ms_ln.onnx --target ort:cuda:fp16 --inputs calib.npz --out plan.json
#   aligner build    ms_ln.onnx --target ort:cuda:fp16 --plan plan.json --tune -o tuned.onnx --inputs calib8.npz
#                    # tuned.onnx.json (the sidecar) carries the chosen runtime options: eval and bench read them
#   aligner eval coco MODEL --data val/images --ann val/instances.json --adapter detr --adapter-outputs logits,boxes \
#       --resize pad --mask-input mask --targets ort:cpu:fp32,ort:cuda:fp16,emu:fp16,...
#   aligner bench MODEL --target TARGET --batch 1,8
#   aligner report RUN_DIRS... -o story1.html
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cpu}
QUICK=${QUICK---quick}
OUT=${OUT:-story1-out}
python benchmarks/story1.py --device "$DEVICE" $QUICK --out "$OUT"
echo "table: $OUT/story1.md  report: $OUT/story1.html"
