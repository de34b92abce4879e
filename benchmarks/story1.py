"""Story 1 end to end (issue 19): a masked-attention DETR-family detector, trained here, and the
seeds' table — step / latency at batch 1 and 8 / throughput / COCO AP — with the command of each row.

On the GPU machine (onnxruntime-gpu and onnxruntime-extensions staged; training capped at 150 s).
The MaskedSoftmax rows run an onnxruntime-extensions Python op on the CPU (~70 ms a batch of 1,
~600 ms a batch of 8 on the H200), so their bench and the tuning dominate: with trained weights,
these settings took 333 s there (the defaults, --runs 100 and 5x20 tuning runs, take over 8 min):

    source .gpu/bin/env.sh && PYTHONPATH=.:.gpu/ext/site:$PYTHONPATH python benchmarks/story1.py --out $OUT \
        --weights .gpu/s1/masked_detr.pt --runs 10 --tune-rounds 2 --tune-runs 3

On a CPU machine, the whole pipeline with tiny settings (ORT CPU instead of CUDA, no TF32 row):

    python benchmarks/story1.py --device cpu --quick --out /tmp/story1

1. The val split: the shipped shapes val images (seed 1), each resized to its own size (64-128
   pixels a side, aspect ratio changed, boxes scaled), so a batch mixes sizes and is padded; the
   training images come from the same generator with seed 0 and the same kind of resize.
2. Training (``aligner/examples/masked_detr.py``, fixed seed): weights (``torch.save`` of the
   state_dict), log, and the ONNX export (legacy exporter, opset 16) to ``--out``.
3. Every row through aligner's CLI, run in this process (``aligner.cli.main.main``): ``build
   --fuse``, ``precision``, ``compare``, ``eval coco --resize pad --mask-input mask``, ``bench``.
   Intermediate files go to ``--work`` (default: a new folder under benchmarks/work/).
4. The tuned row: ``aligner build --tune`` of the fused model with the plan (timed at batch 8);
   ``eval`` and ``bench`` then take the built model, whose sidecar carries the chosen options.
5. ``--out`` gets: masked_detr.onnx, masked_detr.pt, train_log.json, story1.md, story1.json, story1.html.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _work import work_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.examples.masked_detr import CANVAS  # noqa: E402
from story1_train import load_weights, train, write_val  # noqa: E402

# ---- the rows ---------------------------------------------------------------------------------

class Commands:
    """Runs aligner's CLI in this process and keeps each command line (paths shortened to $OUT / $WORK)."""

    def __init__(self, out: Path, work: Path):
        self.out, self.work, self.lines = out, work, []

    def show(self, argv: list[str]) -> str:
        text = "aligner " + shlex.join(str(a) for a in argv)
        return text.replace(str(self.work), "$WORK").replace(str(self.out), "$OUT")

    def run(self, argv: list[str]) -> tuple[int, int]:
        """(exit status, command number)."""
        from aligner.cli.main import main

        self.lines.append(self.show(argv))
        number = len(self.lines)
        print(f"\n[{number}] {self.lines[-1]}", flush=True)
        start = time.time()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # noqa: BLE001 - recorded in the table, the run goes on
            traceback.print_exc()
            rc = 99
        print(f"[{number}] exit {rc} in {time.time() - start:.1f} s", flush=True)
        return rc, number


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="intermediate files (default: a new folder under benchmarks/work/)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a CPU smoke run of the whole pipeline)")
    ap.add_argument("--weights", type=Path, help="skip training: load this state_dict (torch.load weights_only=True)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--train-seconds", type=float, default=150.0, help="training stops here whatever --steps says")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-images", type=int, default=12000)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--runs", type=int, default=100, help="bench: timed runs per point")
    ap.add_argument("--tune-rounds", type=int, default=5, help="build --tune: interleaved timing rounds")
    ap.add_argument("--tune-runs", type=int, default=20, help="build --tune: timed runs per candidate per round")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.train_seconds, args.batch, args.train_images = min(args.steps, 150), min(args.train_seconds, 90), 16, 512
        args.val_images, args.workers, args.runs, args.tune_rounds, args.tune_runs = 40, 1, 5, 2, 3
    wall = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or work_dir("story1-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    if args.device == "cpu":
        import torch

        torch.set_num_threads(1)
    training = load_weights(args.weights, out) if args.weights else train(args, out)
    images, ann = write_val(work / "val", args.val_images)
    model = out / "masked_detr.onnx"
    cmd = Commands(out, work)
    doc = {"device": args.device, "quick": args.quick, "training": {k: v for k, v in training.items() if k != "log"},
           "val": {"images": args.val_images, "annotations": str(ann).replace(str(work), "$WORK")}, "steps": [], "commands": cmd.lines}
    calib = calibration(model, images, ann, work)
    rows = table_rows(cmd, args, model, images, ann, calib, work, doc)
    doc["rows"] = rows
    doc["seconds"] = round(time.time() - wall, 1)
    report(cmd, work, out)
    (out / "story1.json").write_text(json.dumps(doc, indent=1))
    (out / "story1.md").write_text(markdown(doc))
    print("\n" + markdown(doc))
    print(f"total {time.time() - wall:.0f} s")


def calibration(model: Path, images: Path, ann: Path, work: Path) -> Path:
    """16 val images with their masks (the inputs of build checks, precision and compare)."""
    from aligner.eval.dataset import CocoDataset, Preprocess
    from aligner.eval.run import model_feeds

    pre = Preprocess((CANVAS, CANVAS), "pad", 1.0, mask_input="mask")
    x, entries, backs = next(CocoDataset(images, ann, limit=16).batches(pre, 16))
    feeds = model_feeds("pixels", x, entries, backs, pre)
    np.savez(work / "calib.npz", **feeds)
    np.savez(work / "calib8.npz", **{k: v[:8] for k, v in feeds.items()})  # build --tune times at batch 8
    return work / "calib.npz"


def table_rows(cmd: Commands, args, model: Path, images: Path, ann: Path, calib: Path, work: Path, doc: dict) -> list[dict]:
    d = f"ort:{args.device}"
    cuda = args.device == "cuda"
    eval_args = ["--data", images, "--ann", ann, "--adapter", "detr", "--adapter-outputs", "logits,boxes", "--resize", "pad",
                 "--mask-input", "mask", "--batch", 8, "--force"]
    fused_ms, fused_ln, plan = work / "masked_detr.ms.onnx", work / "masked_detr.ms_ln.onnx", work / "plan.json"
    runs = work / "runs"

    # does pure FP16 fail, and where? (measured, not assumed)
    rc, n = cmd.run(["compare", model, "--target", f"{d}:fp16", "--inputs", calib, "--run", runs / "compare_fp16", "--force"])
    doc["pure_fp16_compare"] = _first_divergence(runs / "compare_fp16", rc, n)
    rc_ms, n_ms = cmd.run(["build", model, "--fuse", "masked-softmax", "--target", f"{d}:fp32", "-o", fused_ms, "--inputs", calib, "--force"])
    rc_ln, n_ln = cmd.run(["build", model, "--fuse", "masked-softmax,layernorm", "--target", f"{d}:fp32", "-o", fused_ln, "--inputs", calib,
                           "--force"])
    rc_p, n_p = cmd.run(["precision", fused_ln, "--target", f"{d}:fp16", "--inputs", calib, "--out", plan, "--run", runs / "precision",
                         "--force"])
    pins = len(json.loads(plan.read_text()).get("fp32_nodes", [])) if plan.exists() else None
    doc["plan"] = {"exit": rc_p, "command": n_p, "fp32_nodes": pins}
    evals = {}
    specs = [f"{d}:fp32"] + ([f"{d}:tf32"] if cuda else []) + [f"{d}:fp16", "emu:fp16"]
    evals["orig"] = _eval(cmd, model, ["ort:cpu:fp32"] + [s for s in specs if s != "ort:cpu:fp32"], eval_args, runs / "eval_orig", work)
    evals["ms"] = _eval(cmd, fused_ms, ["ort:cpu:fp32", f"{d}:fp16", "emu:fp16"], eval_args, runs / "eval_ms", work) if rc_ms == 0 else None
    ln_specs = ["ort:cpu:fp32", f"{d}:fp16", "emu:fp16", f"{d}:fp16+plan", "emu:fp16+plan"]
    evals["ms_ln"] = (_eval(cmd, fused_ln, ln_specs, eval_args + (["--plan", plan] if plan.exists() else []), runs / "eval_ms_ln", work)
                      if rc_ln == 0 else None)
    tuned, n_t = _tuned_build(cmd, fused_ln, plan, d, work, doc, args) if plan.exists() else (work / "masked_detr.tuned.onnx", None)
    # the built model runs as built, with its sidecar's options (ort) — the emulator runs the same built graph
    evals["tuned"] = _eval(cmd, tuned, [f"{d}:fp16", "emu:fp16"], eval_args, runs / "eval_tuned", work) if n_t else None
    chosen = doc.get("tune", {}).get("options")
    steps = [
        ("FP32", "orig", model, f"{d}:fp32", "ort:cpu:fp32", [], ""),
        ("TF32", "orig", model, f"{d}:tf32", None, [], "the emulator models FP16/BF16 storage, not TF32"),
        ("pure FP16", "orig", model, f"{d}:fp16", "emu:fp16", [], ""),
        ("FP16 + --fuse masked-softmax", "ms", fused_ms, f"{d}:fp16", "emu:fp16", [n_ms],
         "MaskedSoftmax is an aligner plugin op: on ONNX Runtime it runs as an onnxruntime-extensions Python op on the CPU, "
         "so its latency here is not a fused GPU kernel's"),
        ("+ --fuse layernorm", "ms_ln", fused_ln, f"{d}:fp16", "emu:fp16", [n_ln], ""),
        (f"+ precision plan ({pins if pins is not None else '?'} FP32 nodes)", "ms_ln", fused_ln, f"{d}:fp16+plan", "emu:fp16+plan",
         [n_p], ""),
        (f"+ tuned options ({chosen or 'the build failed'})", "tuned", tuned, f"{d}:fp16", "emu:fp16", [n for n in (n_t,) if n],
         "aligner build --tune: the model built with the plan; bench and eval read the options from its sidecar (bench without "
         "--target)"),
    ]
    rows = []
    for name, key, path, spec, emu, extra, note in steps:
        if not cuda and "tf32" in spec:
            continue
        ev = evals.get(key)
        row = {"step": name, "target": spec, "model": path.name, "note": note, "commands": list(extra)}
        if ev is not None:
            row["commands"].append(ev["command"])
            got = ev["targets"].get(spec)
            row["AP"] = got["AP"] if got else None
            row["AP50"] = got["AP50"] if got else None
            row["nonfinite_images"] = got["nonfinite_images"] if got else None
            row["emulator"] = emu
            row["AP_emulator"] = ev["targets"][emu]["AP"] if emu and emu in ev["targets"] else None
        if path.exists():
            bench_out = runs / f"bench_{len(rows)}"
            target = ["--target", spec] if key != "tuned" else []  # a build: its sidecar's target and options
            rc, n = cmd.run(["bench", path, *target, "--batch", "1,8", "--runs", args.runs, "--warmup", max(2, args.runs // 10),
                             "--json", work / f"bench_{len(rows)}.json", "--run", bench_out, "--force"]
                            + (["--plan", plan] if "+plan" in spec else []))
            row["commands"].append(n)
            if rc == 0:
                bench = {r["batch"]: r for r in json.loads((work / f"bench_{len(rows)}.json").read_text())["rows"]}
                row["latency_ms_b1"] = bench[1]["latency_ms"]["median"] if 1 in bench else None
                row["latency_ms_b8"] = bench[8]["latency_ms"]["median"] if 8 in bench else None
                row["throughput_b8"] = bench[8]["throughput"] if 8 in bench else None
            else:
                row["bench_failed"] = f"exit {rc} (command {n})"
        rows.append(row)
    for precision in ("fp32", "fp16"):
        rows.append({"step": f"TensorRT {precision.upper()} engine (trt:{precision})", "target": f"trt:{precision}", "not_run": True,
                     "note": "not executed: TensorRT engines cannot execute on this machine (TensorRT-RTX refuses compute capability "
                             "9.0 and full TensorRT is not installable here); aligner build --target trt:* can build and serialize them"})
    return rows


def _tuned_build(cmd: Commands, fused_ln: Path, plan: Path, d: str, work: Path, doc: dict, args) -> tuple[Path, int | None]:
    """``aligner build --tune`` of the fused model with the plan, timed at batch 8; the chosen options
    and every candidate's median from the sidecar into ``doc["tune"]``. (path, command number or None)."""
    tuned = work / "masked_detr.tuned.onnx"
    rc, n = cmd.run(["build", fused_ln, "--target", f"{d}:fp16", "--plan", plan, "--tune", "-o", tuned, "--inputs",
                     work / "calib8.npz", "--tune-rounds", args.tune_rounds, "--tune-runs", args.tune_runs, "--force"])
    sidecar = work / "masked_detr.tuned.onnx.json"
    if rc != 0 or not sidecar.exists():
        doc["tune"] = {"command": n, "exit": rc, "failed": True}
        return tuned, None
    side = json.loads(sidecar.read_text())
    tuning = side.get("tuning") or {}
    options = (side.get("target") or {}).get("options") or {}
    doc["tune"] = {"command": n, "exit": rc, "options": ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "defaults",
                   "decision": tuning.get("decision"), "input_shapes": tuning.get("input_shapes"),
                   "candidates": [{k: c.get(k) for k in ("label", "status", "median_ms", "spread_ms", "reason")}
                                  for c in tuning.get("candidates", [])]}
    return tuned, n


def _eval(cmd: Commands, model: Path, specs: list[str], eval_args: list, run_dir: Path, work: Path) -> dict | None:
    out = work / f"{run_dir.name}.json"
    rc, n = cmd.run(["eval", "coco", model, "--targets", ",".join(specs), *eval_args, "--json", out, "--run", run_dir])
    if rc != 0 or not out.exists():
        return {"command": n, "targets": {}, "failed": f"exit {rc}"}
    got = list(json.loads(out.read_text())["targets"].values())  # keyed by the resolved target (plan path): in order given
    return {"command": n, "targets": dict(zip(specs, got))}


def _first_divergence(run_dir: Path, rc: int, number: int) -> dict:
    try:
        summary = json.loads((run_dir / "result.json").read_text())["summary"]
    except (OSError, KeyError, json.JSONDecodeError):
        return {"command": number, "exit": rc, "failed": True}
    first, nonfinite = summary.get("first_divergent"), summary.get("first_nonfinite")
    return {"command": number, "exit": rc, "first_divergent": first, "first_nonfinite": nonfinite,
            "diverging": summary.get("diverging"), "compared": summary.get("compared")}


def report(cmd: Commands, work: Path, out: Path) -> None:
    runs = sorted(p for p in (work / "runs").iterdir() if (p / "meta.json").exists()) if (work / "runs").exists() else []
    if runs:
        cmd.run(["report", *runs, "-o", out / "story1.html", "--title", "Story 1: masked-attention DETR, step by step", "--force"])


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    t = doc["training"]
    lines = [f"Device: {doc['device']}{' (quick smoke settings)' if doc['quick'] else ''}; val: {doc['val']['images']} images of "
             "different sizes, padded to 128×128 with a pixel mask. Training: " +
             (f"{t.get('steps_done')} steps of batch {t.get('batch')} in {t.get('train_seconds')} s on {t.get('device')}"
              if "steps_done" in t else f"weights loaded from {t.get('weights')}") + ".", ""]
    fp16 = doc.get("pure_fp16_compare", {})
    first = fp16.get("first_divergent")
    lines.append("Pure FP16, layer by layer (command %s): " % fp16.get("command") + (
        f"first divergent tensor `{first['tensor']}` from {first['op_type']} `{first['node']}`; "
        f"{fp16.get('diverging')} of {fp16.get('compared')} tensors diverge" if first else
        ("no tensor diverges" if not fp16.get("failed") else "the compare failed (see the command's output)"))
        + (f"; NaN/inf first at `{fp16['first_nonfinite']['node']}`" if fp16.get("first_nonfinite") else "") + ".")
    lines += ["", "| step | target | latency b1 (ms) | latency b8 (ms) | throughput b8 (img/s) | AP | AP50 | NaN/inf images | "
              "emulator (CPU) prediction: AP | commands |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r.get("not_run"):
            lines.append(f"| {r['step']} | `{r['target']}` | {r['note']} | | | | | | | |")
            continue
        emu = f"{_f(r.get('AP_emulator'), '.4f')} (`{r['emulator']}`)" if r.get("emulator") else "—"
        lines.append(f"| {r['step']} | `{r['target']}` | {_f(r.get('latency_ms_b1'), '.3f')} | {_f(r.get('latency_ms_b8'), '.3f')} | "
                     f"{_f(r.get('throughput_b8'), '.0f')} | {_f(r.get('AP'), '.4f')} | {_f(r.get('AP50'), '.4f')} | "
                     f"{_f(r.get('nonfinite_images'), 'd')} | {emu} | {', '.join(str(c) for c in r['commands'])} |")
    notes = [f"* {r['step']}: {r['note']}" for r in doc["rows"] if r.get("note") and not r.get("not_run")]
    tune = doc.get("tune")
    if tune and not tune.get("failed"):
        notes.append(f"* build --tune (command {tune['command']}, inputs {tune.get('input_shapes')}): {tune.get('decision')}")
        notes += [f"  * {c['label']}: {c['status']}" + (f", median {c['median_ms']:.3f} ms" if c.get("median_ms") is not None else "")
                  + (f" ({c['reason'][:160]})" if c.get("reason") and c["status"] != "ok" else "") for c in tune["candidates"]]
    elif tune:
        notes.append(f"* build --tune (command {tune['command']}) failed: exit {tune['exit']}")
    lines += [""] + notes + ["", "Commands (`$OUT`, `$WORK`: the output and work folders):", ""]
    lines += [f"{i}. `{c}`" for i, c in enumerate(doc["commands"], 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
