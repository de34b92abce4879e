"""Build a TensorRT(-RTX) engine of a small box head whose RoIAlign is the aligner plugin.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH python benchmarks/trt_plugin_smoke.py
"""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.examples.plugin_models import masked_attention as _attention  # noqa: E402
from aligner.examples.plugin_models import roi_model as _roi_model  # noqa: E402

from aligner.backends.trt.engine import build_engine  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402

for label, model in [("RoIAlign box head", _roi_model(plugin=True)), ("MaskedSoftmax attention", _attention())]:
    for precision in ("fp32", "fp16"):
        engine = build_engine(ModelGraph(model), precision)
        print(f"{label} {precision}: built {len(engine.data)} bytes by {engine.module} {engine.version}", flush=True)
