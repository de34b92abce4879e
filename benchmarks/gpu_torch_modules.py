"""Module-level table: DETR-R50 (random weights) on torch:cuda:fp32 / tf32 / fp16 / bf16 / autocast vs torch:cpu:fp32.

Run on the GPU machine:

    PYTHONPATH=. python benchmarks/gpu_torch_modules.py [--size 256]

Every module call is captured with forward hooks on both sides and diffed (rel_l2); prints, per
target, the first divergent module (default tolerance of the precision) and the modules with the
largest error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.compare.torch_compare import compare_torch  # noqa: E402
from aligner.examples.testmodels import build_detr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    from transformers import DetrConfig, ResNetConfig

    config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    x = torch.rand(1, 3, args.size, args.size)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; DETR-R50 at {args.size}x{args.size}\n")
    for target in ("torch:cuda:fp32", "torch:cuda:tf32", "torch:cuda:fp16", "torch:cuda:bf16", "torch:cuda:autocast"):
        result = compare_torch(build_detr(config), (x,), target=target)
        worst = sorted(result.modules, key=lambda m: -m.metrics.get("rel_l2", 0.0))[:5]
        first = result.first_divergent
        diverging = sum(m.diverges for m in result.modules)
        print(f"### {target}: {len(result.modules)} module outputs, {diverging} beyond {result.tolerance.metric} "
              f"{result.tolerance.threshold:g}; first divergent: {first.path + ' (' + first.type_name + ')' if first else '-'}\n")
        print("| module | type | rel_l2 | max_abs |")
        print("|---|---|---|---|")
        for m in worst:
            print(f"| {m.path or '(root)'}{'.' + m.key if m.key not in ('out',) else ''} | {m.type_name} | "
                  f"{m.metrics.get('rel_l2', float('nan')):.3g} | {m.metrics.get('max_abs', float('nan')):.3g} |")
        print()


if __name__ == "__main__":
    main()
