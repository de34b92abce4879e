"""A BF16 precision fault whose place is known, bisected on emu:bf16 and on OpenVINO's real BF16 kernels.

    python benchmarks/openvino_bf16_fault.py      # needs a CPU with native BF16 (AVX-512 BF16 or AMX) for the ov row

The model (aligner.examples.faults.cancellation_model): x + 1000 -> MatMul -> - 1000*colsum(W) ("unshift")
-> Relu -> MatMul; BF16 stores x + 1000 in steps of 4, so "unshift" keeps mostly rounding error. Prints,
per target, the first divergent tensor, the root cause and its kind; "unshift" (or the fused kernel
that computes it) is the right answer.
"""

from __future__ import annotations

import numpy as np

from aligner.errors import TargetError
from aligner.examples.faults import cancellation_model
from aligner.graph.model import ModelGraph
from aligner.search.bisect import bisect


def main() -> None:
    graph = ModelGraph(cancellation_model())
    feeds = {"x": np.random.default_rng(1).random((4, 64), dtype=np.float32)}
    print("| target | first divergent | root cause | kind |")
    print("|---|---|---|---|")
    for target in ("emu:bf16", "ov:cpu:bf16"):
        try:
            verdict = bisect(graph, target=target, feeds=feeds)
        except TargetError as exc:  # no native BF16 here: OpenVINO would run f32
            print(f"| {target} | not run: {str(exc)[:120]} | | |")
            continue
        first, cause = verdict.first_divergent, verdict.root_cause
        print(f"| {target} | {first.tensor if first else '-'} ({first.node if first else ''}) | "
              f"{cause.node if cause else '-'} | {cause.kind if cause else '-'} |")


if __name__ == "__main__":
    main()
