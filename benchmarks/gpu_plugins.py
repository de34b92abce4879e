"""Plugin kernels on the GPU against their NumPy references, and TensorRT-RTX builds with plugin nodes.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_plugins.py

1. Each plugin's Triton kernel (what the TensorRT plugin's enqueue launches) on CUDA, FP32 / FP16 /
   BF16 storage, against the reference on the same rounded inputs; RoIAlign also against
   torchvision.ops.roi_align. Kernel time (CUDA events, median of 50) beside the PyTorch eager
   equivalent.
2. TensorRT-RTX: parse, strongly typed build and serialization of models with aligner plugin
   nodes (the spec-driven IPluginV3 found by the ONNX parser), then deserialization, which
   TensorRT-RTX refuses on compute capability 9.0.
"""

import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _work import work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from aligner.plugin import get  # noqa: E402
from aligner_plugins.masked_softmax.kernel import launch as ms_launch  # noqa: E402
from aligner_plugins.roi_align.kernel import launch as roi_launch  # noqa: E402

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_ms(fn, runs=50):
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
import triton  # noqa: E402

print(f"triton {triton.__version__}\n")
print("| kernel | storage | shape | max abs err vs reference | max rel err | kernel ms | PyTorch eager ms |")
print("|---|---|---|---|---|---|---|")
rng = np.random.default_rng(0)
spec = get("MaskedSoftmax")
scores = (rng.normal(size=(2, 8, 100, 850)) * 4).astype(np.float32)
keep = np.ones((2, 1, 1, 850), bool)
keep[0, ..., 700:] = False  # padding
keep[1, ..., :] = False  # an image of padding only: fully masked rows
for name, dt in DT.items():
    s = torch.tensor(scores, device="cuda").to(dt)
    k = torch.tensor(keep, device="cuda")
    out = torch.empty_like(s)
    ms_launch([s, k], [out], spec.attributes)
    torch.cuda.synchronize()
    ref = spec.run_reference(s.float().cpu().numpy(), keep)[0]
    got = out.float().cpu().numpy()
    err = np.abs(got - ref).max()
    eager = lambda: torch.softmax(s.float() + torch.where(k, 0.0, spec.attributes["fill"]), -1).to(dt)  # noqa: E731
    print(f"| MaskedSoftmax | {name} | {tuple(s.shape)} | {err:.3g} | {err / np.abs(ref).max():.3g} | "
          f"{cuda_ms(lambda: ms_launch([s, k], [out], spec.attributes)):.3f} | {cuda_ms(eager):.3f} |")
    assert np.isfinite(got).all(), "MaskedSoftmax kernel produced NaN/inf"

spec = get("RoIAlign")
x = rng.normal(size=(2, 256, 50, 68)).astype(np.float32)
xy = rng.uniform(0, 500, size=(500, 2))
wh = rng.uniform(4, 300, size=(500, 2))
rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
idx = rng.integers(0, 2, 500).astype(np.int64)
try:
    from torchvision.ops import roi_align as tv_roi_align
except Exception:  # noqa: BLE001
    tv_roi_align = None
for name, dt in [("fp32", torch.float32), ("fp16", torch.float16)]:
    for mode, aligned, sr in [("avg", 1, 0), ("avg", 0, 2), ("max", 1, 2)]:
        attrs = {**spec.attributes, "output_height": 7, "output_width": 7, "spatial_scale": 1 / 8, "mode": mode, "aligned": aligned, "sampling_ratio": sr}
        X, R, I = torch.tensor(x, device="cuda").to(dt), torch.tensor(rois, device="cuda"), torch.tensor(idx, device="cuda")
        out = torch.empty((500, 256, 7, 7), device="cuda", dtype=dt)
        roi_launch([X, R, I], [out], attrs)
        torch.cuda.synchronize()
        ref = spec.run_reference(X.float().cpu().numpy(), rois, idx, **attrs)[0]
        got = out.float().cpu().numpy()
        err = np.abs(got - ref).max()
        eager_ms = ""
        if tv_roi_align is not None and mode == "avg":
            boxes = torch.cat([I[:, None].to(dt), R.to(dt)], 1)
            tv = tv_roi_align(X, boxes, (7, 7), 1 / 8, sr, bool(aligned)).float().cpu().numpy()
            eager_ms = f"{cuda_ms(lambda: tv_roi_align(X, boxes, (7, 7), 1 / 8, sr, bool(aligned))):.3f} (torchvision; vs ours {np.abs(tv - got).max():.2g})"
        print(f"| RoIAlign {mode} aligned={aligned} sr={sr} | {name} | {tuple(X.shape)}, 500 boxes | {err:.3g} | {err / np.abs(ref).max():.3g} | "
              f"{cuda_ms(lambda: roi_launch([X, R, I], [out], attrs)):.3f} | {eager_ms} |")

print("\n## TensorRT-RTX: models with plugin nodes")
from aligner.backends.trt.engine import build_engine, load_tensorrt  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402

trt = load_tensorrt()
print(f"{trt.__name__} {trt.__version__}")
from aligner.examples.plugin_models import roi_model as _roi_model  # noqa: E402

cases = [("box head with aligner::RoIAlign", ModelGraph(_roi_model(plugin=True)), {})]
try:
    from aligner.examples.testmodels import export_detr_with_mask  # noqa: E402
    from aligner.passes import fuse_layernorm, fuse_masked_softmax  # noqa: E402

    detr_path, _ = export_detr_with_mask(work_dir("plugins-") / "detr_small.onnx")
    g = ModelGraph(fuse_layernorm(ModelGraph.load(detr_path)).model)
    cases.append((f"DETR (small) --fuse layernorm: {g.op_histogram()['LayerNormalization']} LayerNormalization (standard op)", g, {}))
    g = ModelGraph(fuse_masked_softmax(g).model)
    cases.append((f"DETR (small) --fuse layernorm,masked-softmax: {g.op_histogram()['MaskedSoftmax']} MaskedSoftmax", g, {}))
except Exception:  # noqa: BLE001
    traceback.print_exc()
print("| model | precision | result | engine MiB | seconds |")
print("|---|---|---|---|---|")
last = None
for label, graph, shapes in cases:
    for precision in ("fp32", "fp16"):
        start = time.perf_counter()
        try:
            engine = build_engine(graph, precision, [], shapes)
            last = engine if "MaskedSoftmax" not in label else last
            print(f"| {label} | {precision} | built, serialized | {len(engine.data) / 2**20:.2f} | {time.perf_counter() - start:.1f} |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {label} | {precision} | FAILED: {str(exc)[:400]} | | {time.perf_counter() - start:.1f} |")


from aligner.backends.trt.runner import CollectingLogger  # noqa: E402

if last is not None:
    logger = CollectingLogger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(last.data)
    print("\ndeserialize the last engine:", "ok" if engine is not None else "refused")
    for m in logger.messages[-3:]:
        print("  TensorRT-RTX said:", m[:300])
