"""Numeric limits of the low-precision types, derived from their definitions (one place).

``numpy.finfo`` knows float16; numpy has no bfloat16, so its limits follow from its layout
(8 exponent bits like FP32, 7 mantissa bits).
"""

from __future__ import annotations

import numpy as np

_fp16 = np.finfo(np.float16)
_fp32 = np.finfo(np.float32)

FP16_MAX = float(_fp16.max)  # 65504: larger magnitudes become inf
FP16_MIN_NORMAL = float(_fp16.smallest_normal)  # 6.1e-5: below it, precision degrades (subnormals)
FP16_MIN_SUBNORMAL = float(_fp16.smallest_subnormal)  # 6.0e-8: below it, values flush to zero
BF16_MAX = float((2 - 2.0**-7) * 2.0**127)  # 3.3895e38
BF16_MIN_NORMAL = float(_fp32.smallest_normal)  # same exponent range as FP32

# The largest finite value of each low precision (what overflows to inf beyond it).
LOW_MAX = {"fp16": FP16_MAX, "bf16": BF16_MAX}
# Below this magnitude a value is zero once stored in that precision.
FLUSH_BELOW = {"fp16": FP16_MIN_SUBNORMAL, "bf16": float(2.0**-133)}

__all__ = ["BF16_MAX", "BF16_MIN_NORMAL", "FLUSH_BELOW", "FP16_MAX", "FP16_MIN_NORMAL", "FP16_MIN_SUBNORMAL", "LOW_MAX"]
