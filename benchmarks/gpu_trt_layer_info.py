"""TensorRT layer information on the GPU machine: what TensorRT-RTX allows of the deployed-graph map.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_trt_layer_info.py

Builds the tiny ViT (decomposed LayerNorms) in FP16 with detailed profiling verbosity, then tries
to read the engine inspector's layer information (it needs a deserialized engine) and map it onto
the ONNX graph with aligner.graph.deployed.kernels_of_trt / map_deployed. Prints each step's result;
a step that TensorRT-RTX refuses on compute capability 9.0 is reported as refused, with its message.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.backends.trt.engine import build_engine, layer_information, load_tensorrt  # noqa: E402
from aligner.backends.trt.runner import CollectingLogger  # noqa: E402
from aligner.examples import tiny_vit  # noqa: E402
from aligner.graph.deployed import kernels_of_trt, map_deployed  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402


def main() -> None:
    trt = load_tensorrt()
    graph = ModelGraph(tiny_vit())
    shapes = {i.name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape) for i in graph.input_infos()}
    start = time.perf_counter()
    engine = build_engine(graph, "fp16", (), shapes)
    print(f"build: ok, {trt.__name__} {trt.__version__}, {len(engine.data) / 2**20:.2f} MiB in {time.perf_counter() - start:.1f} s, "
          f"profiling verbosity DETAILED: {hasattr(trt, 'ProfilingVerbosity')}")
    logger = CollectingLogger(trt)
    runtime = trt.Runtime(logger)
    deserialized = runtime.deserialize_cuda_engine(engine.data)
    if deserialized is None:
        print("deserialize: refused:", " | ".join(logger.messages[-3:]))
        print("layer information: not readable here (the inspector needs a deserialized engine)")
        return
    print("deserialize: ok")
    info = layer_information(trt, deserialized)
    if info is None:
        print("layer information: the inspector gave nothing")
        return
    kernels = kernels_of_trt(info)
    deployed = map_deployed(graph, kernels, f"{trt.__name__} fp16")
    fused = deployed.fused
    print(f"layer information: {len(kernels)} layers, {len(fused)} fused, {len(deployed.boundaries)} original tensors kept, "
          f"{sum(len(k.originals) for k in fused)} nodes inside fused layers")
    for k in fused[:12]:
        print(f"  {k.op_type:<16} {k.name[:70]!r}: {len(k.originals)} nodes ({', '.join(k.originals[:3])}, ...)")
    print(json.dumps(info)[:1500])


if __name__ == "__main__":
    main()
