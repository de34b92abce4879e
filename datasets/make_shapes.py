"""Regenerate a split of the synthetic shapes dataset (COCO layout: images/ + instances.json).

    python datasets/make_shapes.py datasets/shapes_val --count 200 --seed 1   # the shipped val split

The generator itself is ``aligner/examples/shapes.py`` (deterministic: same seed and index, same
image); training draws seed 0 (``datasets/train_detector.py``).
"""

import argparse
from pathlib import Path

from aligner.examples.shapes import write_split

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1, help="split seed (val = 1; training uses 0)")
    args = ap.parse_args()
    print(write_split(args.out, args.count, args.seed))
