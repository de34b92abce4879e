"""Injected faults in real trained models: does bisect name the edited node, within its run bound?

For each model, the weights of one Conv/MatMul/Gemm at a time (spread evenly through the graph) are
multiplied by 1.1, and ``bisect REF --target-model EDITED`` runs on ONNX Runtime CPU FP32 (fusions on,
as deployed: Conv+BatchNorm folds, MatMul+Add, LayerNorm...) with ``--strategy frontier`` and ``auto``.
A case is *named* when the first divergent node is the edited one. The frontier's target runs are
held to ceil(log2 N)+2 (halving plus sweep; the isolation run that names the root cause is apart).

The models come from PyPI wheels (PP-OCRv4 det/rec and the PP-OCR classifier from rapidocr_onnxruntime,
Google's magika, Silero VAD); ``--fetch`` downloads them into --models (nothing is committed).
``--baseline DIR`` runs the same cases with another checkout of aligner (e.g. a ``git worktree`` of
the previous commit) in a subprocess and prints both side by side.

    python benchmarks/true_verdicts.py --fetch --models ~/.cache/aligner-bench/wheels --per-model 10
    python benchmarks/true_verdicts.py --models DIR --baseline /tmp/old
    python benchmarks/true_verdicts.py --models DIR --baseline /tmp/old --strategies frontier --capture-budget-mb 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# model file -> input shapes (symbolic dims made concrete at the sizes these models are fed)
MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 320, 320)},
    "ch_PP-OCRv4_rec_infer.onnx": {"x": (1, 3, 48, 320)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
    "model.onnx": {"bytes": (1, 2048)},  # magika
    "silero_vad_openvino_16k.onnx": {},
}
WHEELS = ["rapidocr_onnxruntime==1.4.4", "magika==1.0.3", "silero-vad==6.2.3"]


def fetch(directory: Path) -> None:
    """Download the wheels (no dependencies) and extract the models listed in MODELS."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(directory), *WHEELS], check=True)
    for wheel in directory.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if Path(name).name in MODELS and not (directory / Path(name).name).exists():
                    (directory / Path(name).name).write_bytes(z.read(name))


def cases(path: Path, per_model: int) -> list[str]:
    """Names of ``per_model`` weighted nodes spread evenly through the topological order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    nodes = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1
             and n.input[1] in weights and n.name]
    step = max(1, len(nodes) // per_model)
    return nodes[::step][:per_model]


def edit(path: Path, node: str, out: Path, factor: float = 1.1) -> None:
    import onnx
    from onnx import numpy_helper as nh

    model = onnx.load(str(path))
    target = next(n for n in model.graph.node if n.name == node)
    name = target.input[1]
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(nh.from_array(nh.to_array(t) * factor, name))
            break
    else:
        const = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
        value = const.attribute[0].t
        value.CopyFrom(nh.from_array(nh.to_array(value) * factor, value.name))
    onnx.save(model, str(out))


def run_cases(models: Path, per_model: int, strategies: list[str], budget: float = 512) -> list[dict]:
    """Every case with the aligner importable in this process (the checkout under test)."""
    import aligner
    from aligner import bisect
    from aligner.graph.model import ModelGraph
    from aligner.inputs import make_inputs

    rows = []
    for file, shapes in MODELS.items():
        path = models / file
        if not path.exists():
            print(f"skipping {file}: not in {models} (use --fetch)", file=sys.stderr)
            continue
        graph = ModelGraph.load(path)
        feeds = make_inputs(graph, shapes)
        with tempfile.TemporaryDirectory() as tmp:
            for node in cases(path, per_model):
                edited = Path(tmp) / "edited.onnx"
                edit(path, node, edited)
                for strategy in strategies:
                    start = time.perf_counter()
                    result = bisect(graph, target="ort:cpu:fp32", target_model=str(edited), feeds=feeds, strategy=strategy,
                                    capture_budget_mb=budget)
                    searching = [p for p in result.probes if p.phase in ("outputs", "frontier", "sweep", "all")]
                    rows.append({"model": file, "node": node, "strategy": strategy, "aligner": str(Path(aligner.__file__).parent.parent),
                                 "named": result.first_divergent is not None and result.first_divergent.node == node,
                                 "found": result.first_divergent.node if result.first_divergent else None,
                                 "runs": len(searching), "bound": math.ceil(math.log2(result.nodes)) + 2,
                                 "sweep": sum(p.phase == "sweep" for p in result.probes),
                                 "seconds": round(time.perf_counter() - start, 2)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows_by_label: dict[str, list[dict]]) -> str:
    lines = ["| checkout | strategy | model | named | frontier runs over ceil(log2 N)+2 | median s |", "|---|---|---|---|---|---|"]
    for label, rows in rows_by_label.items():
        for strategy in sorted({r["strategy"] for r in rows}):
            for model in [*MODELS, "all"]:
                chosen = [r for r in rows if r["strategy"] == strategy and (model == "all" or r["model"] == model)]
                if not chosen:
                    continue
                over = sum(r["runs"] > r["bound"] for r in chosen) if strategy == "frontier" else "-"
                secs = sorted(r["seconds"] for r in chosen)[len(chosen) // 2]
                lines.append(f"| {label} | {strategy} | {model} | {sum(r['named'] for r in chosen)} of {len(chosen)} | {over} | {secs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path.home() / ".cache" / "aligner-bench" / "wheels")
    ap.add_argument("--fetch", action="store_true", help="download the wheels and extract the models first")
    ap.add_argument("--per-model", type=int, default=6)
    ap.add_argument("--strategies", default="frontier,auto")
    ap.add_argument("--capture-budget-mb", type=float, default=512, help="bisect's capture budget (512, its default; small values "
                    "make the frontier halve in many runs)")
    ap.add_argument("--baseline", type=Path, help="another aligner checkout to run the same cases with, side by side")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # the baseline's subprocess
    args = ap.parse_args()
    if args.fetch:
        fetch(args.models)
    strategies = args.strategies.split(",")
    if args.rows_only:
        print(json.dumps(run_cases(args.models, args.per_model, strategies, args.capture_budget_mb)))
        return
    results = {"this checkout": run_cases(args.models, args.per_model, strategies, args.capture_budget_mb)}
    if args.baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(args.baseline)}
        out = subprocess.run([sys.executable, __file__, "--models", str(args.models), "--per-model", str(args.per_model),
                              "--strategies", args.strategies, "--capture-budget-mb", str(args.capture_budget_mb), "--rows-only"], env=env, capture_output=True, text=True, check=True,
                             cwd=str(args.baseline))
        results[f"baseline ({args.baseline})"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(table(results))


if __name__ == "__main__":
    main()
