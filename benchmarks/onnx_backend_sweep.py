"""Every model of ONNX's own backend test data through inspect, compare and bisect on emu:fp16.

The models and inputs ship inside the onnx wheel (``onnx/backend/test/data/{simple,
pytorch-converted,pytorch-operator}/*/model.onnx`` with ``test_data_set_0/input_*.pb``): small,
odd, valid ONNX (sequences, optionals, scalars, 0-d and empty tensors, integer-only graphs). Each
model runs in a child process of its own (a runtime crash ends that child, not the sweep), which
calls the three commands through ``aligner.cli.main.main`` on the model's test inputs (as .npz).

Each command's outcome is one of
  ok         exit 0 or 1 (agrees / diverges)
  clear      exit 2 or 3 with aligner's one-line error (usage, input, target cannot run)
  traceback  an exception aligner did not turn into a message, or the child died (signal)

    python benchmarks/onnx_backend_sweep.py [--jobs 2] [--json benchmarks/work/onnx_backend_sweep.json] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SETS = ("simple", "pytorch-converted", "pytorch-operator")
COMMANDS = ("inspect", "compare", "bisect")

CHILD = r'''
import contextlib, io, json, sys, traceback
from pathlib import Path
import numpy as np, onnx
from onnx import numpy_helper

model, work = Path(sys.argv[1]), Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)

def read(path):
    """A test input as numpy: a tensor, or (sequence/optional) None, with what it is."""
    data = path.read_bytes()
    for proto, kind in ((onnx.TensorProto, "tensor"), (onnx.SequenceProto, "sequence"), (onnx.OptionalProto, "optional")):
        p = proto()
        try:
            p.ParseFromString(data)
        except Exception:
            continue
        if kind == "tensor" and (p.dims or p.data_type) and p.ByteSize():
            value = numpy_helper.to_array(p)
            return (value.astype(str) if value.dtype == object else value), kind  # strings: .npz holds them as unicode
        if kind != "tensor" and p.ByteSize():
            return None, kind
    return None, "unreadable"

graph = onnx.load(str(model), load_external_data=False).graph
inits = {i.name for i in graph.initializer}
names = [i.name for i in graph.input if i.name not in inits]
feeds, note = {}, ""
for i, name in enumerate(names):
    f = model.parent / "test_data_set_0" / f"input_{i}.pb"
    if not f.exists():
        note = f"no test input {f.name}"
        break
    value, kind = read(f)
    if value is None:
        note = f"input {name!r} is a {kind} (not storable in .npz)"
        break
    feeds[name] = value
inputs = work / "inputs.npz"
if not note:
    np.savez(inputs, **feeds)

from aligner.cli.main import main

args = {"inspect": ["inspect", str(model)],
        "compare": ["compare", str(model), "--target", "emu:fp16", "--inputs", str(inputs)],
        "bisect": ["bisect", str(model), "--target", "emu:fp16", "--inputs", str(inputs)]}
for command, argv in args.items():
    if note and command != "inspect":
        argv = argv[:4]  # generated inputs (the test input cannot be written as .npz)
    out, err = io.StringIO(), io.StringIO()
    row = {"command": command, "note": note if command != "inspect" else ""}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        row |= {"exit": code}
    except SystemExit as exc:
        row |= {"exit": exc.code if isinstance(exc.code, int) else 2}
    except BaseException as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        row |= {"exit": None, "traceback": f"{type(exc).__name__}: {str(exc)[:200]} ({Path(tb.filename).name}:{tb.lineno} {tb.name})"}
    lines = [l for l in err.getvalue().splitlines() if "error:" in l]  # aligner's one-line error
    lines += [" ".join(out.getvalue().split("FAILED", 1)[1].split())] if "FAILED" in out.getvalue() else []  # bisect: target failed
    row["message"] = lines[-1][:300] if lines else ""
    print(json.dumps(row), flush=True)
'''


def models(root: Path, only: str | None) -> list[Path]:
    found = [m for s in SETS for m in sorted((root / s).glob("*/model.onnx"))]
    return [m for m in found if only is None or only in str(m)]


def classify(row: dict) -> str:
    if row.get("traceback") or row.get("exit") is None:
        return "traceback"
    if row["exit"] in (0, 1):
        return "ok"
    if row["exit"] in (2, 3) and row.get("message"):
        return "clear"
    return "traceback"


def sweep_one(model: Path, work: Path, timeout: int) -> list[dict]:
    name = f"{model.parent.parent.name}/{model.parent.name}"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(work / name.replace("/", "__"))],
                              capture_output=True, text=True, timeout=timeout)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        died = proc.returncode != 0
        tail = proc.stderr.strip().splitlines()[-1:] if died else []
    except subprocess.TimeoutExpired:
        rows, died, tail = [], True, [f"timed out after {timeout} s"]
    done = {r["command"] for r in rows}
    for command in COMMANDS:
        if command not in done:  # the child died (a signal) or hung during this command
            rows.append({"command": command, "exit": None, "traceback": f"child process ended: {' '.join(tail) or 'no output'}"})
            break
    seconds = time.perf_counter() - start
    return [r | {"model": name, "outcome": classify(r), "seconds": round(seconds, 1)} for r in rows]


def main() -> int:
    import onnx

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="models in parallel (default 2)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model (default 300)")
    p.add_argument("--only", help="models whose path contains this")
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "work" / "onnx_backend_sweep.json"))
    args = p.parse_args()
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    work = Path(args.json).parent / "onnx_backend_sweep"
    work.mkdir(parents=True, exist_ok=True)
    todo = models(root, args.only)
    start = time.perf_counter()
    rows: list[dict] = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(lambda m: sweep_one(m, work, args.timeout), todo):
            rows += result
            for r in result:
                if r["outcome"] != "ok":
                    print(f"{r['model']:<50} {r['command']:<8} {r['outcome']:<9} {r.get('traceback') or r.get('message')}", flush=True)
    counts = {c: {o: sum(1 for r in rows if r["command"] == c and r["outcome"] == o) for o in ("ok", "clear", "traceback")}
              for c in COMMANDS}
    summary = {"onnx": onnx.__version__, "models": len(todo), "seconds": round(time.perf_counter() - start), "counts": counts,
               "rows": rows}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"{len(todo)} models (onnx {onnx.__version__}), {summary['seconds']} s")
    for command, c in counts.items():
        print(f"  {command:<8} ok {c['ok']:>3}  clear error {c['clear']:>3}  traceback {c['traceback']:>3}")
    return 1 if any(c["traceback"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
