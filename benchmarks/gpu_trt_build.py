"""Build TensorRT-RTX engines of the example detector on the GPU machine (they build; they do not run on CC 9.0).

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH python benchmarks/gpu_trt_build.py

Builds trt:fp32, trt:fp16 and trt:fp16 with the committed plan (strongly typed, from aligner's
rewrite), one with three intermediate tensors marked as outputs (what frontier bisect does), and
reports a parser failure on a model with an op TensorRT does not know.
"""

import json
import sys
import time
from pathlib import Path

from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner.backends.trt.engine import build_engine  # noqa: E402
from aligner.errors import AlignerError  # noqa: E402
from aligner.examples import shapes_detector_path  # noqa: E402
from aligner.graph.model import ModelGraph  # noqa: E402

graph = ModelGraph.load(shapes_detector_path())
plan = [p["node"] for p in json.loads((Path(__file__).resolve().parents[1] / "datasets" / "shapes_detector.plan.json").read_text())["fp32_nodes"]]
shapes = {"pixels": (1, 3, 128, 128)}
print("| build | engine MiB | seconds | outputs | unmarked |")
print("|---|---|---|---|---|")
for label, precision, pins, mark in [("trt:fp32", "fp32", [], []), ("trt:fp16", "fp16", [], []), ("trt:fp16 + plan", "fp16", plan, []),
                                     ("trt:fp16 + plan, 3 tensors marked", "fp16", plan,
                                      ["/stem_norm/Pow_output_0", "/stem_norm/ReduceMean_1_output_0", "/blocks.0/norm1/Div_output_0"])]:
    start = time.perf_counter()
    engine = build_engine(graph, precision, pins, shapes, mark)
    print(f"| {label} | {len(engine.data) / 2**20:.2f} | {time.perf_counter() - start:.1f} | {len(engine.outputs)} | {list(engine.unmarked)} |")
print(f"\nbuilt by {engine.module} {engine.version}")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
bad = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
                                           helper.make_node("MyPlugin", ["r"], ["y"], name="custom/my_plugin", domain="my.ops")],
                                          "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
try:
    build_engine(ModelGraph(bad, None), "fp32")
except AlignerError as exc:
    print("parser failure reported as:", exc)

# Execution: TensorRT-RTX refuses compute capability 9.0; record exactly how it says so.
from aligner.backends.trt.engine import load_tensorrt  # noqa: E402

trt = load_tensorrt()


from aligner.backends.trt.runner import CollectingLogger  # noqa: E402

logger = CollectingLogger(trt)
engine_bytes = build_engine(graph, "fp16", plan, shapes).data
runtime = trt.Runtime(logger)
engine = runtime.deserialize_cuda_engine(engine_bytes)
context = engine.create_execution_context() if engine is not None else None
print("deserialize:", "ok" if engine is not None else "refused", "| execution context:", "ok" if context is not None else "refused")
for m in logger.messages[-4:]:
    print("  TensorRT-RTX said:", m[:300])
