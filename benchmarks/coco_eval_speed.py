"""Images/s of the COCO evaluation: pycocotools vs faster-coco-eval on the 100-image known-answer set.

    python benchmarks/coco_eval_speed.py [path/to/shared/data/cocoeval]

Both backends run through ``aligner.eval.evaluate_coco`` (loading, evaluate, accumulate,
summarize), interleaved, 7 rounds; the table gives the median and the ratio measured side by side.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from aligner.eval import evaluate_coco


def main(data: Path) -> None:
    gt, dt = data / "instances_val2014_100.json", data / "instances_val2014_fakebbox100_results.json"
    times = {"pycocotools": [], "faster-coco-eval": []}
    stats = {}
    for _ in range(7):
        for backend in times:
            start = time.perf_counter()
            stats[backend] = evaluate_coco(gt, dt, "bbox", backend).stats
            times[backend].append(time.perf_counter() - start)
    print("| backend | median s (100 images, bbox) | images/s | AP |")
    print("|---|---|---|---|")
    for backend, ts in times.items():
        m = statistics.median(ts)
        print(f"| {backend} | {m:.3f} | {100 / m:.0f} | {stats[backend][0]:.10f} |")
    a, b = (statistics.median(t) for t in times.values())
    print(f"\nspeed-up of faster-coco-eval: {a / b:.1f}x; largest stat difference: "
          f"{np.max(np.abs(np.subtract(stats['pycocotools'], stats['faster-coco-eval']))):.1e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data" / "cocoeval")
