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

The real model (issue 28's "done" benchmark): ``--model ppocr-det`` downloads RapidOCR's wheel
(``pip download --no-deps rapidocr_onnxruntime==1.4.4``, as true_verdicts.py does) and takes PP-OCRv4's
text detector from it (or ``--model PATH.onnx``); its samples are generated document pages (white
paper, dark text-like strokes in lines), normalised as PP-OCR's det preprocessing does. ``--mode
precision`` runs the whole command (calibration + sweep + ranking + trials), as a user would::

    aligner precision det.onnx --target ort:cpu:int8 --calib calib/ --inputs-dir eval/ --accept "rel_l2<=0.2" \
        --out plan.json --save-model det.int8.onnx

and then checks the written QDQ model against the acceptance on ``--heldout`` other pages::

    python benchmarks/int8_memory.py --model ppocr-det --size 1024x800 --counts 16 64 --mode precision
    python benchmarks/int8_memory.py --model ppocr-det --size 1024x800 --counts 256 --mode calibration
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
from aligner.quant.calib import load_calibration, reporting
from aligner.quant.ranges import calibrate
model, folder, count, tmp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
sub = tmp / f"calib{count}"
sub.mkdir(exist_ok=True)
for f in sorted(folder.glob("*.npz"))[:count]:
    if not (sub / f.name).exists():
        (sub / f.name).symlink_to(f)
calibration = load_calibration(ModelGraph.load(model), sub)
with open(tmp / f"progress{count}.txt", "w") as out, reporting(lambda phase, done, total: print(phase, done, total, file=out, flush=True)):
    calibrate(model, calibration.samples, sys.argv[5].split(","))
"""


PP_OCR_MEAN, PP_OCR_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # PP-OCR det's NormalizeImage


def document_page(height: int, width: int, seed: int) -> np.ndarray:
    """A generated document page, 1x3xHxW float32 as PP-OCR's det preprocessing feeds it ((x/255 - mean)/std):
    light paper with noise, lines of dark text-like glyphs (strokes of random width, gaps between words)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 235.0 + rng.integers(0, 20), np.float32) + rng.normal(0, 3, (height, width, 3)).astype(np.float32)
    y = int(rng.integers(10, 40))
    while y < height - 30:
        line, x, ink = int(rng.integers(12, 36)), int(rng.integers(10, 60)), rng.integers(0, 80, 3)
        end = int(rng.integers(width // 3, width - 10))
        while x < end:
            glyph, stroke = int(rng.integers(line // 3, line)), max(1, line // 8)
            for _ in range(int(rng.integers(2, 5))):
                if rng.random() < 0.5:
                    sx = x + int(rng.integers(0, glyph))
                    img[y:y + line, sx:sx + stroke] = ink
                else:
                    sy = y + int(rng.integers(0, line))
                    img[sy:sy + stroke, x:x + glyph] = ink
            x += glyph + int(rng.integers(1, line // 2 + 2)) + (line if rng.random() < 0.12 else 0)
        y += line + int(rng.integers(6, 40))
    mean, std = np.array(PP_OCR_MEAN, np.float32).reshape(3, 1, 1), np.array(PP_OCR_STD, np.float32).reshape(3, 1, 1)
    return ((np.clip(img, 0, 255).transpose(2, 0, 1) / 255 - mean) / std)[None].astype(np.float32)


def ppocr_det(directory: Path) -> Path:
    """PP-OCRv4's text detector from RapidOCR's wheel (downloaded once into ``directory``)."""
    from true_verdicts import fetch

    path = directory / "ch_PP-OCRv4_det_infer.onnx"
    if not path.exists():
        fetch(directory)
    return path


PRECISION = """
import sys
from aligner.cli.main import main
sys.exit(main(["precision", *sys.argv[1:]]))
"""

HELDOUT = """
import json, sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from aligner.compare.metrics import rel_l2
model, qdq, folder, bound = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
options = ort.SessionOptions()
options.log_severity_level = 3  # not the unused-initializer warnings
ref, test = (ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for m in (model, qdq))
values = []
for f in sorted(folder.glob("*.npz")):
    feeds = dict(np.load(f))
    values.append(max(rel_l2(r, t) for r, t in zip(ref.run(None, feeds), test.run(None, feeds))))
print(json.dumps({"rel_l2": values, "passed": all(v <= bound for v in values)}))
"""


def measure(script: str, args: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(peak RSS of the process tree in MiB, wall seconds, error or '')."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if cwd is not None:
        (cwd / "stdout.txt").write_bytes(out)
        (cwd / "stderr.txt").write_bytes(err)
    error = "" if proc.returncode == 0 else f"exit {proc.returncode}: {err.decode()[-300:]}"
    return peak / 2**20, time.perf_counter() - start, error


def precision_row(model: Path, calib: Path, count: int, tmp: Path, args) -> dict:
    """The whole ``aligner precision`` command with ``count`` calibration samples, then its QDQ model on held-out pages."""
    run = tmp / f"precision{count}"
    run.mkdir()
    sub = _subset(calib, count, tmp)
    cli = [str(model), "--target", "ort:cpu:int8", "--calib", str(sub), "--inputs-dir", str(tmp / "eval"), "--accept", args.accept,
           "--out", "plan.json", "--save-model", "det.int8.onnx", *(["--max-trials", str(args.max_trials)] if args.max_trials else [])]
    mib, seconds, error = measure(PRECISION, cli, cwd=run)
    row = {"samples": count, "precision_mib": mib, "precision_s": seconds, "precision_error": error}
    stdout = (run / "stdout.txt").read_text().splitlines()
    row["verdict"] = next((line for line in stdout if any(w in line for w in ("PASSED", "NOT VERIFIED", "NO PASSING PLAN"))), "")
    if (run / "plan.json").exists():
        plan = json.loads((run / "plan.json").read_text())
        row.update(float_nodes=len(plan.get("fp32_nodes", [])), trials=plan.get("trials"), passed=plan.get("passed"))
    if (run / "det.int8.onnx").exists():
        proc = subprocess.run([sys.executable, "-c", HELDOUT, str(model), str(run / "det.int8.onnx"), str(tmp / "heldout"),
                               args.accept.split("<=")[1]], capture_output=True, text=True)
        row["heldout"] = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr[-300:]
    return row


def _subset(folder: Path, count: int, tmp: Path) -> Path:
    sub = tmp / f"calib{count}"
    sub.mkdir(exist_ok=True)
    for f in sorted(folder.glob("*.npz"))[:count]:
        if not (sub / f.name).exists():
            (sub / f.name).symlink_to(f)
    return sub


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="640x640", help="input HxW (default 640x640)")
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--before-max", type=int, default=16, help="largest sample count to run 'before' with (it holds every sample's tensors)")
    ap.add_argument("--model", default="dbnet-like", help="dbnet-like (built in code, random images), ppocr-det (downloaded, "
                    "document pages) or PATH.onnx (document pages)")
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "aligner-bench" / "wheels"), help="where ppocr-det is downloaded")
    ap.add_argument("--mode", choices=("calibration", "precision"), default="calibration",
                    help="calibration: before/after calibration only; precision: the whole aligner precision command")
    ap.add_argument("--eval", type=int, default=4, help="--inputs-dir samples of --mode precision (default 4)")
    ap.add_argument("--heldout", type=int, default=8, help="held-out pages the written QDQ model is checked on (default 8)")
    ap.add_argument("--accept", default="rel_l2<=0.2")
    ap.add_argument("--max-trials", type=int, default=0, help="--max-trials of --mode precision (default: the command's own)")
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--methods", default="minmax,entropy,percentile",
                    help="calibration methods of 'after' (default: the three of the settings sweep; minmax alone: what --no-sweep calibrates)")
    ap.add_argument("--keep", help="work in this folder (kept: data, logs, calibration progress) instead of a temp one")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="int8-memory-") as tmp:
        tmp = Path(args.keep or tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        model, name, pages = _model(args.model, Path(args.models_dir), tmp, height, width)

        def write(folder: str, count: int, seed: int) -> Path:
            (tmp / folder).mkdir(exist_ok=True)
            rng = np.random.default_rng(seed)
            for i in range(count):
                file = tmp / folder / f"{i:04d}.npz"
                image = rng.random((1, 3, height, width), dtype=np.float32)  # drawn always: the same values with --keep
                if not file.exists():  # --keep: written once
                    np.savez(file, **{name: document_page(height, width, seed + i) if pages else image})
            return tmp / folder

        calib = write("calib", max(args.counts), 0)
        per_sample = _calibrated_mb(model, name, height, width)
        print(f"{args.model} 1x3x{height}x{width}: {per_sample:.0f} MiB of calibrated tensors per sample")
        rows = []
        if args.mode == "precision":
            write("eval", args.eval, 10_000)
            write("heldout", args.heldout, 20_000)
            for count in args.counts:
                rows.append(precision_row(model, calib, count, tmp, args))
                print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"{'samples':>8} {'before MiB':>11} {'before s':>9} {'after MiB':>10} {'after s':>8}")
        for count in args.counts if args.mode == "calibration" else ():
            row = {"samples": count}
            if count <= args.before_max:
                row["before_mib"], row["before_s"], err = measure(BEFORE, [str(model), str(calib), str(count), str(tmp)])
                row["before_error"] = err
            row["after_mib"], row["after_s"], err = measure(AFTER, [str(model), str(calib), str(count), str(tmp), args.methods])
            row["after_error"] = err
            rows.append(row)
            before = f"{row['before_mib']:11.0f} {row['before_s']:9.1f}" if "before_mib" in row else f"{'-':>11} {'-':>9}"
            print(f"{count:8d} {before} {row['after_mib']:10.0f} {row['after_s']:8.1f}"
                  + "".join(f"  {k}: {v}" for k, v in row.items() if k.endswith("error") and v), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "size": args.size, "mode": args.mode, "per_sample_mib": per_sample,
                                               "rows": rows}, indent=1))


def _model(choice: str, models_dir: Path, tmp: Path, height: int, width: int) -> tuple[Path, str, bool]:
    """(model path, its input's name, whether its samples are document pages)."""
    if choice == "dbnet-like":
        model = tmp / "dbnet_like.onnx"
        onnx.save(dbnet_like(height, width), str(model))
        return model, "image", False
    model = ppocr_det(models_dir) if choice == "ppocr-det" else Path(choice)
    return model, onnx.load(str(model), load_external_data=False).graph.input[0].name, True


def _calibrated_mb(model: Path, name: str, height: int, width: int) -> float:
    """One sample's calibrated tensors (what ONNX Runtime's histogram calibrators keep per sample), MiB."""
    from aligner.compare.layerwise import estimate_sizes
    from aligner.graph.model import ModelGraph

    graph = ModelGraph.load(model)
    sizes = estimate_sizes(graph, {name: np.zeros((1, 3, height, width), np.float32)})
    return sum(sizes.get(t, 0) for t in [name, *graph.activations()]) / 2**20


if __name__ == "__main__":
    main()
