"""Polygraphy doing what `aligner compare MODEL --target ort:cpu:fp32` does, through its Python API.

    python benchmarks/polygraphy_two_ort.py MODEL INPUTS.json

Two ONNX Runtime runners on the CPU in one `Comparator.run`: the reference with graph optimizations
off (ORT_DISABLE_ALL, aligner's reference) and the target with ONNX Runtime's default (ORT_ENABLE_ALL,
aligner's `ort:cpu:fp32`), every tensor marked as an output (`constants.MARK_ALL`, = `--onnx-outputs
mark all`), then `Comparator.compare_accuracy` over every output with its default `simple` rule. It is
the script `polygraphy run --gen-script` writes for one runner, with a second runner added: the CLI
has one `--graph-optimization-level` for all its ONNX Runtime runners, so on the command line the
same work takes two runs (`--save-outputs`, then `--load-outputs`). Exits 0 when every output
matches, 1 otherwise (as `polygraphy run`).
"""

from __future__ import annotations

import sys


def main(model: str, inputs: str) -> int:
    import onnxruntime as ort
    from polygraphy import constants
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, StreamingDataLoader

    marked = BytesFromOnnx(ModifyOutputs(OnnxFromPath(model), outputs=constants.MARK_ALL))
    levels = {"reference": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "target": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    runners = [OnnxrtRunner(SessionFromOnnx(marked, providers=["cpu"], graph_optimization_level=level), name=name)
               for name, level in levels.items()]
    runs = Comparator.run(runners, data_loader=StreamingDataLoader([inputs], allow_dirs=True), streaming=True)
    return 0 if bool(Comparator.compare_accuracy(runs)) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
