"""Does the default INT8 search finish? Trials, float nodes, wall and peak RSS of ``aligner precision`` on a
real model, with the code of any checkout (issue 28, "a search that finishes").

    python benchmarks/int8_search_finish.py                                  # PP-OCR cls, this checkout
    python benchmarks/int8_search_finish.py --code /tmp/base                 # the same with another checkout's aligner
    python benchmarks/int8_search_finish.py --model det --size 640x640 --calib 16 --eval 4 --accept "rel_l2<=0.2"

Models: RapidOCR's wheel (``rapidocr_onnxruntime==1.4.4``, as true_verdicts.py fetches it): ``cls`` is
``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (1x3x48x192, text images drawn with PIL as int8_vs_baselines.py
draws them), ``det`` is ``ch_PP-OCRv4_det_infer.onnx`` (generated document pages, int8_memory.py's). The
command, in a child process whose tree's peak RSS is sampled (psutil, 20 ms)::

    aligner precision MODEL --target ort:cpu:int8 --calib calib/ --inputs-dir eval/ [--accept ...] --out plan.json

Then, with ``--check-minimal`` (default on), the plan is checked 1-minimal independently of the search: each
kept node is removed alone, the model quantized by ONNX Runtime (this checkout's quantizer, the plan's settings)
and run on the evaluation samples on ORT's integer kernels; a removal that still passes is an unnecessary node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from int8_memory import PRECISION, document_page, measure  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
FILES = {"cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx"}


def model_path(choice: str, models_dir: Path) -> Path:
    if choice not in FILES:
        return Path(choice)
    path = models_dir / FILES[choice]
    if not path.exists():
        from true_verdicts import fetch

        fetch(models_dir)
    return path


def write_samples(folder: Path, choice: str, name: str, count: int, seed: int, size: tuple[int, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if choice == "cls":
        from int8_vs_baselines import preprocess, text_images

        arrays = preprocess(text_images(count, (48, 192), seed), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    else:
        arrays = [document_page(*size, seed + i) for i in range(count)]
    for i, array in enumerate(arrays):
        np.savez(folder / f"{i:04d}.npz", **{name: array})
    return folder


def unnecessary(model: Path, plan_file: Path, eval_dir: Path) -> list[str]:
    """Kept nodes whose removal alone still passes the plan's acceptance (this checkout's quantizer; the plan's
    settings and calibration data, read from it as ``ort:cpu:int8+plan.json`` reads them)."""
    from aligner.backends import make_runner, reference_runner
    from aligner.backends.target import Target
    from aligner.compare.tolerance import tolerance_for
    from aligner.graph.model import ModelGraph
    from aligner.search.acceptance import Acceptance, check_outputs

    plan = json.loads(plan_file.read_text())
    graph = ModelGraph.load(model)
    target = Target.parse(f"ort:cpu:int8+{plan_file}")
    accept = Acceptance.parse(plan["accept"], base=tolerance_for(target))
    samples = [dict(np.load(f)) for f in sorted(eval_dir.glob("*.npz"))]
    ref = reference_runner(graph)
    expected = [ref.run(s) for s in samples]
    pins = {p["node"] for p in plan["fp32_nodes"]}
    out = []
    for node in sorted(pins):
        runner = make_runner(graph, target.with_pins(sorted(pins - {node})))
        if not any(check_outputs(accept, e, runner.run(s), {}) for s, e in zip(samples, expected)):
            out.append(node)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cls", help="cls, det (RapidOCR's wheel) or PATH.onnx (document pages)")
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "aligner-bench" / "wheels"))
    ap.add_argument("--size", default="640x640", help="det's input HxW (cls is 48x192)")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    ap.add_argument("--eval", type=int, default=8, help="--inputs-dir samples (default 8)")
    ap.add_argument("--accept", action="append", default=[], help="--accept of the command (default: the target's tolerance)")
    ap.add_argument("--code", default=str(HERE), help="the checkout whose aligner runs the command (default this one)")
    ap.add_argument("--extra", default="", help="more arguments of the command, e.g. '--workers 2'")
    ap.add_argument("--check-minimal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--keep", help="work here (kept) instead of a temporary folder")
    ap.add_argument("--json", help="write the row here too")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    model = model_path(args.model, Path(args.models_dir))
    import onnx

    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="int8-finish-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib = write_samples(work / "calib", args.model, name, args.calib, 0, size)
        eval_dir = write_samples(work / "eval", args.model, name, args.eval, 10_000, size)
        run = work / "run"
        run.mkdir(exist_ok=True)
        for f in ("plan.json", "plan.trials.jsonl"):
            (run / f).unlink(missing_ok=True)
        cli = [str(model), "--target", "ort:cpu:int8", "--calib", str(calib), "--inputs-dir", str(eval_dir), "--out", "plan.json",
               *[a for spec in args.accept for a in ("--accept", spec)], *args.extra.split()]
        os.environ["PYTHONPATH"] = args.code  # the child imports that checkout's aligner
        mib, seconds, error = measure(PRECISION, cli, cwd=run)
        os.environ.pop("PYTHONPATH")
        stdout = (run / "stdout.txt").read_text().splitlines()
        row = {"model": args.model, "code": args.code, "calib": args.calib, "eval": args.eval, "extra": args.extra,
               "peak_rss_mib": round(mib), "wall_s": round(seconds, 1), "error": error,
               "verdict": next((line for line in stdout if line.startswith(("PASSED", "NOT VERIFIED", "NO PASSING PLAN"))), "")}
        if (run / "plan.json").exists():
            plan = json.loads((run / "plan.json").read_text())
            row.update(passed=plan["passed"], float_nodes=len(plan["fp32_nodes"]), trials=plan["trials"])
            phases: dict[str, int] = {}
            for line in (run / "plan.trials.jsonl").read_text().splitlines()[1:]:
                phase = json.loads(line)["phase"]
                phases[phase] = phases.get(phase, 0) + 1
            row["phases"] = phases
            if args.check_minimal and plan["passed"]:
                row["unnecessary"] = unnecessary(model, run / "plan.json", eval_dir)
        print(json.dumps(row))
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
