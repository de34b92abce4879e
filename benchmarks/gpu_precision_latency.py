"""Latency of FP32, pure FP16 and the precision plan's mixed model on ONNX Runtime CUDA.

Run on the device after staging onnxruntime-gpu (see ../shared/gpu/stage):

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_precision_latency.py

For each example model the plan is searched on the real GPU target (``ort:cuda:fp16``), then the
three models are timed in three alternating rounds with I/O bound on the GPU (inputs copied once; outputs left on the device),
after warm-up, as the median of ``--runs`` runs with the device synchronised by ORT's run call.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _work import work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.graph.precision import rewrite_precision  # noqa: E402
from aligner.search.precision import search_precision  # noqa: E402
from precision_vs_baselines import accepts, models  # noqa: E402


def latency_ms(model, feeds: dict, runs: int = 300, warmup: int = 30) -> float:
    """Median latency with I/O bound on the GPU (aligner's bench timing)."""
    from aligner.backends import make_runner
    from aligner.graph.model import ModelGraph

    runner = make_runner(ModelGraph(model), "ort:cuda:fp32")  # precision comes from the model's own types
    return statistics.median(runner.time(feeds, runs, warmup))


def detr_r50(size: int = 800) -> tuple:
    """DETR-R50 (random weights) at ``size`` with overflow sites in three FFNs, built here."""
    import torch
    from transformers import DetrConfig, ResNetConfig

    from aligner.examples.testmodels import build_detr
    from aligner.examples.testmodels import export_onnx as _export
    from aligner.graph.model import ModelGraph
    from aligner.inputs import make_inputs

    from aligner.examples.faults import inject_overflow_site

    path = work_dir("precision-latency-") / "detr_r50.onnx"
    config = DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)
    _export(build_detr(config), (torch.randn(1, 3, size, size),), path, dynamo=False, input_names=["pixel_values"], output_names=["logits", "boxes"])
    graph = ModelGraph.load(path)
    feeds = make_inputs(graph)
    for layer in ("encoder/layers.0", "encoder/layers.3", "decoder/layers.5"):
        inject_overflow_site(graph, f"/detr/model/{layer}/mlp/fc1/MatMul", f"/detr/model/{layer}/mlp/fc2/MatMul", feeds)
    return ModelGraph(graph.model), feeds


def interleaved(models_: list, feeds: dict, rounds: int = 3) -> list[float]:
    """Median latency per model over ``rounds`` alternating rounds (machines are noisy)."""
    per = [[] for _ in models_]
    for _ in range(rounds):
        for i, m in enumerate(models_):
            per[i].append(latency_ms(m, feeds))
    return [statistics.median(x) for x in per]


def main() -> None:
    print("onnxruntime", ort.__version__, ort.get_available_providers())
    print("| model | plan pins (found on ort:cuda:fp16) | trials | plan passes emu:fp16 | FP32 ms | pure FP16 ms | mixed ms | mixed / FP16 |")
    print("|---|---|---|---|---|---|---|---|")
    cases = models()
    cases["DETR-R50 800x800, 3 injected sites"] = detr_r50()
    for label, (graph, feeds) in cases.items():
        plan = search_precision(graph, target="ort:cuda:fp16", samples=[feeds])
        pure = rewrite_precision(graph, [], "fp16").model
        mixed = rewrite_precision(graph, plan.fp32_nodes, "fp16").model
        t32, t16, tmix = interleaved([graph.model, pure, mixed], feeds)
        ok = accepts(graph, feeds, plan.fp32_nodes)
        print(f"| {label} | {len(plan.pins)} | {plan.trials} | {ok} | {t32:.3f} | {t16:.3f} | {tmix:.3f} | {tmix / t16:.3f} |")
    np.random.seed(0)


if __name__ == "__main__":
    main()
