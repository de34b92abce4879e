"""Peak memory of INT8 calibration vs the number of calibration samples (issue 28).

    python benchmarks/int8_memory.py                       # 1x3x640x640, 4/16/64 samples
    python benchmarks/int8_memory.py --size 1024x800 --counts 4 16 --before-max 16

The model is a DBNet-like text detector built in code (random He-initialised weights: memory
does not depend on them): a strided conv backbone (1/2 … 1/32), an FPN neck (1x1 lateral convs,
nearest upsampling, 3x3 convs, all levels resized to 1/4 and concatenated) and the DB head
(conv, two ConvTranspose x2, Sigmoid). Each run is a child process; peak RSS is the largest RSS
of its process tree, sampled every 20 ms (psutil).

* **before**: ONNX Runtime's calibrators as aligner used them until now — ``quantize_static``'s
  calibration, one ``create_calibrator`` per method of the settings sweep (minmax, entropy,
  percentile), ``collect_data`` over all samples at once, the samples held in memory.
* **after**: ``aligner.quant.ranges.calibrate`` with the three methods (one shared streaming
  pass), samples read from disk one at a time (``aligner.quant.calib.load_calibration``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper


def dbnet_like(height: int, width: int, neck: int = 96, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True, name: str = "") -> str:
        w = rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.out"], name=name, pads=[k // 2] * 4,
                                      strides=[stride] * 2))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    def upsample(x: str, factor: int, name: str) -> str:
        scales = f"{name}.scales"
        inits.append(numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), scales))
        nodes.append(helper.make_node("Resize", [x, "", scales], [f"{name}.out"], name=name, mode="nearest"))
        return f"{name}.out"

    x, cin, stages = "image", 3, []
    for i, (cout, blocks) in enumerate([(16, 1), (32, 2), (64, 2), (128, 2), (256, 2)]):
        x = conv(x, cin, cout, stride=2, name=f"backbone.s{i}.down")
        for b in range(blocks - 1):
            x = conv(x, cout, cout, name=f"backbone.s{i}.b{b}")
        cin = cout
        if i >= 1:
            stages.append((x, cout))
    laterals = [conv(t, c, neck, k=1, relu=False, name=f"neck.lat{i}") for i, (t, c) in enumerate(stages)]
    top = laterals[-1]
    merged = [top]
    for i in range(len(laterals) - 2, -1, -1):
        nodes.append(helper.make_node("Add", [laterals[i], upsample(top, 2, f"neck.up{i}")], [f"neck.sum{i}"], name=f"neck.add{i}"))
        top = f"neck.sum{i}"
        merged.insert(0, top)
    outs = [conv(m, neck, neck // 4, name=f"neck.out{i}") for i, m in enumerate(merged)]
    outs = [o if i == 0 else upsample(o, 2 ** i, f"neck.to4_{i}") for i, o in enumerate(outs)]
    nodes.append(helper.make_node("Concat", outs, ["neck.fuse"], name="neck.concat", axis=1))
    h = conv("neck.fuse", neck, neck // 4, name="head.conv")
    for i, cout in enumerate((neck // 4, 1)):
        w = rng.normal(0, 0.1, (neck // 4, cout, 2, 2)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"head.up{i}.w"))
        nodes.append(helper.make_node("ConvTranspose", [h, f"head.up{i}.w"], [f"head.up{i}"], name=f"head.up{i}", strides=[2, 2]))
        h = f"head.up{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [h], ["head.up0.relu"], name="head.up0.relu"))
            h = "head.up0.relu"
    nodes.append(helper.make_node("Sigmoid", [h], ["maps"], name="head.sigmoid"))
    graph = helper.make_graph(nodes, "dbnet_like", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, height, width])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1, 1, height, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


BEFORE = """
import sys, time
from pathlib import Path
import numpy as np
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
model, folder, count, tmp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
samples = [dict(np.load(f)) for f in sorted(folder.glob("*.npz"))[:count]]  # held in memory, as aligner's Calibration did
for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):  # the sweep, one per method
    it = iter(samples)
    class Reader:
        def get_next(self):
            return next(it, None)
    calibrator = create_calibrator(Path(model), None, str(tmp / "augmented.onnx"), calibrate_method=method, extra_options={})
    calibrator.collect_data(Reader())
    calibrator.compute_data()
    del calibrator
"""

AFTER = """
import sys
from pathlib import Path
from aligner.graph.model import ModelGraph
from aligner.quant.calib import load_calibration
from aligner.quant.ranges import calibrate
model, folder, count, tmp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
sub = tmp / f"calib{count}"
sub.mkdir(exist_ok=True)
for f in sorted(folder.glob("*.npz"))[:count]:
    (sub / f.name).symlink_to(f)
calibration = load_calibration(ModelGraph.load(model), sub)
calibrate(model, calibration.samples, ["minmax", "entropy", "percentile"])
"""


def measure(script: str, args: list[str]) -> tuple[float, float, str]:
    """(peak RSS of the process tree in MiB, wall seconds, error or '')."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    error = "" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.read().decode()[-300:]}"
    return peak / 2**20, time.perf_counter() - start, error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="640x640", help="input HxW (default 640x640)")
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--before-max", type=int, default=16, help="largest sample count to run 'before' with (it holds every sample's tensors)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="int8-memory-") as tmp:
        tmp = Path(tmp)
        model = tmp / "dbnet_like.onnx"
        onnx.save(dbnet_like(height, width), str(model))
        calib = tmp / "calib"
        calib.mkdir()
        rng = np.random.default_rng(0)
        for i in range(max(args.counts)):
            np.savez(calib / f"{i:04d}.npz", image=rng.random((1, 3, height, width), dtype=np.float32))
        per_sample = _calibrated_mb(model, height, width)
        print(f"DBNet-like detector 1x3x{height}x{width}: {per_sample:.0f} MiB of calibrated tensors per sample")
        print(f"{'samples':>8} {'before MiB':>11} {'before s':>9} {'after MiB':>10} {'after s':>8}")
        rows = []
        for count in args.counts:
            row = {"samples": count}
            if count <= args.before_max:
                row["before_mib"], row["before_s"], err = measure(BEFORE, [str(model), str(calib), str(count), str(tmp)])
                row["before_error"] = err
            row["after_mib"], row["after_s"], err = measure(AFTER, [str(model), str(calib), str(count), str(tmp)])
            row["after_error"] = err
            rows.append(row)
            before = f"{row['before_mib']:11.0f} {row['before_s']:9.1f}" if "before_mib" in row else f"{'-':>11} {'-':>9}"
            print(f"{count:8d} {before} {row['after_mib']:10.0f} {row['after_s']:8.1f}"
                  + "".join(f"  {k}: {v}" for k, v in row.items() if k.endswith("error") and v), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "per_sample_mib": per_sample, "rows": rows}, indent=1))


def _calibrated_mb(model: Path, height: int, width: int) -> float:
    """One sample's calibrated tensors (what ONNX Runtime's histogram calibrators keep per sample), MiB."""
    from aligner.compare.layerwise import estimate_sizes
    from aligner.graph.model import ModelGraph

    graph = ModelGraph.load(model)
    sizes = estimate_sizes(graph, {"image": np.zeros((1, 3, height, width), np.float32)})
    return sum(sizes.get(t, 0) for t in ["image", *graph.activations()]) / 2**20


if __name__ == "__main__":
    main()
