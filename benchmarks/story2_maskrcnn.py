"""Story 2 end to end (issue 19): torchvision's Mask R-CNN → ONNX → ONNX Runtime, then FP16.

On the GPU machine (torchvision preinstalled, onnxruntime-gpu staged; about 4-6 minutes):

    source .gpu/bin/env.sh && PYTHONPATH=.:$PYTHONPATH python benchmarks/story2_maskrcnn.py --out $OUT

The FP16 stages alone (234 s on the H200): ``--skip-torch-compare --skip-fp16-compare
--no-fusion-check --max-trials 8 --bench-options cudnn_conv_algo_search=HEURISTIC``.

``--standin`` runs every stage on the CPU with the two-stage head of ``aligner/examples/two_stage.py``
instead (no torchvision: a smoke test of the script itself).

1. ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``: **random weights** (no trained
   weights on this machine), eval mode, seed 0, ``box_score_thresh=0`` so that detections exist,
   a fixed 1×3×512×512 synthetic image of shapes (``min_size=max_size=512``: no resize inside).
2. Legacy export (opset 17, else 16, else 11) and aligner's PyTorch-vs-ONNX-Runtime comparison
   (:func:`aligner.compare.torch_compare.compare_torch`, target ort:cuda:fp32): first divergent
   module and its root cause (``discrete`` when a TopK/NMS picks between tied candidates).
3. FP16 on ort:cuda:fp16: no pins; aligner's node-level plan (``search_precision``: outputs finite
   and at least 80 % of the FP32 baseline's matched detections); the seed's op-type pinning —
   every node of ``Concat, Add`` and of ``Concat, Conv, Add, Sub, Mul, Exp, Sqrt, Log`` (as pins,
   the same mechanism as a plan). Per variant: pins, NaN/inf, matched detections (IoU ≥ 0.5, same
   label, vs ORT CUDA FP32), rel_l2 of matched boxes / scores / masks, latency (``aligner.bench``).
Each stage is guarded: a failure is recorded in the table and the run goes on. Writes
story2.md, story2.json and story2.html (aligner's report: FP16 layer-by-layer compare, the plan,
latency) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from _work import work_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED_SHORT = ("Concat", "Add")
SEED_FULL = ("Concat", "Conv", "Add", "Sub", "Mul", "Exp", "Sqrt", "Log")
OUTPUTS = ["boxes", "labels", "scores", "masks"]


class Log:
    """Each stage guarded and timed; stages after the time budget are skipped (recorded as such)."""

    def __init__(self, budget_s: float):
        self.stages: list[dict] = []
        self.deadline = time.time() + budget_s
        self.save = lambda: None  # writes what is known so far (a killed run still leaves its table)

    def stage(self, name: str, fn, *a, **kw):
        print(f"\n== {name}", flush=True)
        start = time.time()
        if start > self.deadline:
            self.stages.append({"stage": name, "ok": False, "seconds": 0.0, "error": "skipped: past the time budget (--budget)"})
            self.save()
            return None
        try:
            value = fn(*a, **kw)
            self.stages.append({"stage": name, "ok": True, "seconds": round(time.time() - start, 1)})
            self.save()
            return value
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            self.stages.append({"stage": name, "ok": False, "seconds": round(time.time() - start, 1),
                                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"})
            self.save()
            return None


def synthetic_image(size: int = 512) -> np.ndarray:
    """A fixed image: shapes on a textured background (the shapes generator, upscaled 4x), 0-1 floats."""
    from PIL import Image

    from aligner.examples.shapes import render

    tiles = [render(i, 3)[0] for i in range(4)]
    grid = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    image = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return image.transpose(2, 0, 1)[None].copy()


def maskrcnn():
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    net = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0,
                                                             min_size=512, max_size=512)

    class Detections(nn.Module):  # one image in, the four tensors of its detections out
        def __init__(self):
            super().__init__()
            self.model = net

        def forward(self, image):
            out = self.model(image)[0]
            return out["boxes"], out["labels"], out["scores"], out["masks"]

    return Detections().eval(), torchvision.__version__


def standin():
    import torch

    from aligner.examples.two_stage import TwoStage, features

    torch.manual_seed(0)
    return TwoStage().eval(), features(tie=True)


def export(model, x: np.ndarray, path: Path, names: list[str]) -> int:
    import torch

    last = None
    for opset in (17, 16, 11):
        try:
            torch.onnx.export(model, (torch.from_numpy(x),), str(path), opset_version=opset, dynamo=False, input_names=["image"],
                              output_names=names)
            return opset
        except Exception as exc:  # noqa: BLE001 - try the next opset
            print(f"export at opset {opset} failed: {str(exc).splitlines()[0][:300]}", flush=True)
            last = exc
    raise RuntimeError(f"export failed at opsets 17, 16, 11: {last}")


# ---- accuracy of a variant against FP32 -------------------------------------------------------

def rel_l2(r: np.ndarray, t: np.ndarray) -> float:
    r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
    return float(np.linalg.norm(t - r) / max(np.linalg.norm(r), 1e-12)) if r.size else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def accuracy(ref: dict, out: dict) -> dict:
    """NaN/inf, and detections matched greedily (IoU >= 0.5, same label) with rel_l2 of what matched."""
    nonfinite = int(sum(np.size(v) - np.isfinite(v).sum() for v in out.values() if np.asarray(v).dtype.kind == "f"))
    if not all(k in ref and k in out for k in ("boxes", "labels", "scores")):  # not a detector: rel_l2 per output
        return {"nonfinite": nonfinite, **{f"rel_l2_{k}": rel_l2(ref[k], out[k]) if np.shape(ref[k]) == np.shape(out[k]) else None
                                           for k in ref if np.asarray(ref[k]).dtype.kind == "f"}}
    rb, tb = np.asarray(ref["boxes"], np.float64), np.asarray(out["boxes"], np.float64)
    pairs = []
    if len(rb) and len(tb):
        iou = _iou(rb, tb)
        iou[np.asarray(ref["labels"])[:, None] != np.asarray(out["labels"])[None]] = 0
        iou[~np.isfinite(iou)] = 0
        used = set()
        for i in range(len(rb)):
            for j in np.argsort(-iou[i]):
                if iou[i, j] < 0.5:
                    break
                if j not in used:
                    used.add(int(j))
                    pairs.append((i, int(j)))
                    break
    ri, ti = (np.asarray([p[k] for p in pairs], int) for k in (0, 1))
    doc = {"nonfinite": nonfinite, "ref_detections": len(rb), "detections": len(tb), "matched": len(pairs),
           "matched_share": len(pairs) / len(rb) if len(rb) else 1.0,
           "rel_l2_boxes": rel_l2(rb[ri], tb[ti]) if pairs else None,
           "rel_l2_scores": rel_l2(np.asarray(ref["scores"])[ri], np.asarray(out["scores"])[ti]) if pairs else None}
    if "masks" in ref and "masks" in out and pairs:
        doc["rel_l2_masks"] = rel_l2(np.asarray(ref["masks"])[ri], np.asarray(out["masks"])[ti])
    return doc


# ---- stages -----------------------------------------------------------------------------------

def torch_vs_onnx(model, x, path: Path, target: str) -> dict:
    import torch

    from aligner.compare.torch_compare import compare_torch

    result = compare_torch(model, [torch.from_numpy(x)], onnx=path, target=target)
    doc = result.to_dict()
    doc["verdict"] = result.verdict()
    doc["modules"] = [m for m in doc["modules"] if m["diverges"]][:40]  # the divergent ones, first 40
    print(doc["verdict"], flush=True)
    return doc


def run_outputs(graph, target, feeds: dict) -> dict:
    from aligner.backends import make_runner, reference_runner
    from aligner.backends.target import REFERENCE

    runner = reference_runner(graph) if str(target) == REFERENCE else make_runner(graph, target)
    return {k: np.asarray(v) for k, v in runner.run(feeds).items()}


def op_type_pins(graph, types) -> list[str]:
    return [n.name for n in graph.nodes if n.op_type in types]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--standin", action="store_true", help="the test's two-stage head instead of Mask R-CNN (CPU smoke run)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--max-trials", type=int, default=15)
    ap.add_argument("--budget", type=float, default=300, help="seconds; stages that would start later are skipped")
    ap.add_argument("--skip-torch-compare", action="store_true", help="only the FP16 stages (the torch comparison takes ~140 s on the H200)")
    ap.add_argument("--bench-options", metavar="K=V[,K=V]", help="also time every variant with these runtime options "
                    "(e.g. cudnn_conv_algo_search=HEURISTIC: the tuned-builds finding)")
    ap.add_argument("--skip-fp16-compare", action="store_true", help="no FP16 layer-by-layer compare (~60 s on the H200)")
    ap.add_argument("--no-fusion-check", dest="fusion_check", action="store_false",
                    help="the plan search skips its fusion-dependence check (re-runs the plan on the CPU emulator: ~100 s here)")
    args = ap.parse_args()
    wall = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir("story2-").resolve()
    log = Log(args.budget)
    d = f"ort:{args.device}"
    doc: dict = {"device": args.device, "standin": args.standin, "stages": log.stages, "variants": []}

    def save() -> None:
        doc["seconds"] = round(time.time() - wall, 1)
        (out / "story2.json").write_text(json.dumps(doc, indent=1, default=str))
        (out / "story2.md").write_text(markdown(doc))

    log.save = save
    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
    if args.standin:
        model, x = standin()
        names = ["head"]
        doc["model"] = "stand-in: the two-stage head of aligner/examples/two_stage.py (scorer, TopK, NMS, head)"
    else:
        built = log.stage("build torchvision Mask R-CNN (random weights)", maskrcnn)
        model, version = built if built else (None, None)
        x, names = synthetic_image(), OUTPUTS
        doc["model"] = (f"torchvision {version} maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0, "
                        "min_size=max_size=512): RANDOM WEIGHTS (no trained weights here), eval, seed 0; input 1x3x512x512 "
                        "synthetic shapes image")
    path = work / "model.onnx"
    opset = log.stage("export to ONNX (legacy exporter)", export, model, x, path, names) if model is not None else None
    doc["opset"] = opset
    if opset is not None:
        if not args.skip_torch_compare:
            doc["torch_vs_onnx"] = log.stage(f"aligner torch-vs-ONNX compare on {d}:fp32", torch_vs_onnx, model, x, path, f"{d}:fp32")
        report_runs = fp16_stages(log, doc, path, x, d, work, args)
        if report_runs:
            from aligner.report import write_report

            log.stage("HTML report", write_report, report_runs, out / "story2.html", True,
                      "Story 2: Mask R-CNN (random weights) FP16 on ONNX Runtime" if not args.standin else "Story 2 (stand-in)")
    save()
    print("\n" + markdown(doc))


def fp16_stages(log: Log, doc: dict, path: Path, x: np.ndarray, d: str, work: Path, args) -> list[Path]:
    from aligner.backends.target import Target
    from aligner.graph.model import ModelGraph
    from aligner.report import write_run

    graph = ModelGraph.load(path)
    feeds = {graph.input_names[0]: x}
    np.savez(work / "inputs.npz", **feeds)
    ref = log.stage(f"{d}:fp32 outputs", run_outputs, graph, Target.parse(f"{d}:fp32"), feeds)
    cpu = log.stage("ort:cpu:fp32 outputs (noise floor)", run_outputs, graph, Target.parse("ort:cpu:fp32"), feeds)
    if ref is None:
        return []
    floor = accuracy(ref, cpu) if cpu is not None else {}
    doc["noise_floor"] = {"what": f"ort:cpu:fp32 against {d}:fp32", **floor}
    runs: list[Path] = []
    if not args.skip_fp16_compare:
        compared = log.stage(f"layer-by-layer compare {d}:fp16", _compare_run, graph, f"{d}:fp16", feeds, work / "runs" / "compare_fp16")
        if compared:
            runs.append(compared)
    plan = log.stage(f"aligner precision on {d}:fp16", _plan, graph, f"{d}:fp16", feeds, ref, floor, work, args.max_trials,
                     args.fusion_check)
    if plan is not None:
        doc["plan"] = {k: v for k, v in plan.to_dict().items() if k in ("fp32_nodes", "passed", "trials", "acceptance")}
        runs.append(write_run(work / "runs" / "precision", "precision", graph, plan.to_dict(), force=True))
    variants = [("pure FP16 (no pins)", [])]
    if plan is not None:
        variants.append((f"aligner plan ({len(plan.fp32_nodes)} nodes)", [p if isinstance(p, str) else p.node for p in plan.fp32_nodes]))
    variants += [(f"seed: op types {', '.join(SEED_SHORT)}", op_type_pins(graph, SEED_SHORT)),
                 (f"seed: op types {', '.join(SEED_FULL)}", op_type_pins(graph, SEED_FULL))]
    targets = [Target.parse(f"{d}:fp32")]
    for name, pins in variants:
        target = Target.parse(f"{d}:fp16", pins=pins)
        row = {"variant": name, "pins": len(pins), "target": f"{d}:fp16" + (f" + {len(pins)} FP32 pins" if pins else "")}
        got = log.stage(f"outputs: {name}", run_outputs, graph, target, feeds)
        row.update(accuracy(ref, got) if got is not None else {"failed": "did not run (see stages)"})
        doc["variants"].append(row)
        targets.append(target)
    options = dict(kv.split("=", 1) for kv in args.bench_options.split(",")) if args.bench_options else {}
    if options:
        doc["bench_options"] = args.bench_options
        targets += [t.with_options(options) for t in targets]
    bench = log.stage("latency (aligner bench)", _bench, graph, targets, args.runs)
    if bench is not None:
        n = len(doc["variants"]) + 1
        doc["fp32_latency_ms"] = bench.rows[0].latency_ms["median"]
        for row, b in zip(doc["variants"], bench.rows[1:n]):
            row["latency_ms"] = b.latency_ms["median"]
        if options:
            doc["fp32_latency_ms_options"] = bench.rows[n].latency_ms["median"]
            for row, b in zip(doc["variants"], bench.rows[n + 1:]):
                row["latency_ms_options"] = b.latency_ms["median"]
        runs.append(write_run(work / "runs" / "bench", "bench", graph, bench.to_dict(), force=True))
    return runs


def _compare_run(graph, target: str, feeds: dict, run_dir: Path) -> Path:
    from aligner.compare import compare
    from aligner.report import write_run

    result = compare(graph, target=target, feeds=feeds)
    print(result.verdict(), flush=True)
    return write_run(run_dir, "compare", graph, result.to_dict(), force=True)


def _plan(graph, target: str, feeds: dict, ref: dict, floor: dict, work: Path, max_trials: int, fusion_check: bool = True):
    from aligner.search.precision import Acceptance, search_precision

    want = 0.8 * floor.get("matched_share", 1.0)

    def task(runner) -> str:
        got = accuracy(ref, {k: np.asarray(v) for k, v in runner.run(feeds).items()})
        if "matched_share" not in got:
            worst = max((v for k, v in got.items() if k.startswith("rel_l2") and v is not None), default=0.0)
            return "" if worst <= 0.05 else f"rel_l2 {worst:.3g} > 0.05"
        return "" if got["matched_share"] >= want else f"matched {got['matched_share']:.0%} of FP32 detections < {want:.0%}"

    accept = Acceptance(threshold=math.inf, task=task, task_name=f"matched detections >= {want:.0%} of FP32's (IoU 0.5, same label)")
    return search_precision(graph, target, samples=[feeds], accept=accept, max_trials=max_trials,
                            trials_log=work / "plan.trials.jsonl", fusion_check=fusion_check)


def _bench(graph, targets, runs: int):
    from aligner.bench import bench

    return bench(graph, targets, batches=[1], runs=runs, warmup=max(3, runs // 10))


def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    lines = [f"Model: {doc.get('model')}; ONNX opset {doc.get('opset')}; device {doc['device']}.", ""]
    tvo = doc.get("torch_vs_onnx")
    if tvo:
        cause = tvo.get("root_cause") or {}
        lines += [f"**PyTorch vs ONNX Runtime** ({tvo['target']}): {tvo['verdict']}", "",
                  f"Root cause kind: `{cause.get('kind', '—')}` at `{cause.get('node', '—')}` ({cause.get('op_type', '—')}); "
                  f"modules said to inherit it: {len(cause.get('inheriting', []))}.", ""]
    floor = doc.get("noise_floor")
    if floor:
        lines += [f"Noise floor ({floor['what']}): matched {_f(floor.get('matched_share'), '.1%')} of detections, NaN/inf "
                  f"{floor.get('nonfinite')}.", ""]
    opt = doc.get("bench_options")
    lines += [f"FP32 latency (batch 1): {_f(doc.get('fp32_latency_ms'), '.2f')} ms"
              + (f"; with {opt}: {_f(doc.get('fp32_latency_ms_options'), '.2f')} ms" if opt else "") + ".", "",
              "| FP16 variant | FP32 pins | NaN/inf values | detections matched (of FP32's) | rel_l2 boxes | rel_l2 scores | "
              "rel_l2 masks | latency b1 (ms) |" + (f" latency b1, {opt} (ms) |" if opt else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if opt else "")]
    for r in doc.get("variants", []):
        matched = f"{r['matched']} / {r['ref_detections']} ({r['matched_share']:.0%})" if "matched" in r else r.get("failed", "—")
        lines.append(f"| {r['variant']} | {r['pins']} | {_f(r.get('nonfinite'), 'd')} | {matched} | {_f(r.get('rel_l2_boxes'), '.3g')} | "
                     f"{_f(r.get('rel_l2_scores'), '.3g')} | {_f(r.get('rel_l2_masks'), '.3g')} | {_f(r.get('latency_ms'), '.2f')} |"
                     + (f" {_f(r.get('latency_ms_options'), '.2f')} |" if opt else ""))
    lines += ["", "Stages:", ""] + [f"* {s['stage']}: {'ok' if s['ok'] else 'FAILED — ' + s['error']} ({s['seconds']} s)"
                                    for s in doc["stages"]]
    lines += ["", "TensorRT: engines cannot execute on this machine (TensorRT-RTX refuses compute capability 9.0); not measured."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
