"""PP-OCRv4 det at 640x640: aligner's default INT8 search vs NNCF 3.4 accuracy control, same acceptance (issue 28).

The model is RapidOCR's trained PP-OCRv4 text detector (``int8_memory.ppocr_det``: downloaded from its
PyPI wheel, or ``--model PATH``); the data generated document pages (``int8_memory.document_page``):
16 for calibration, 4 evaluated by the search, 8 held out. The acceptance is the CLI's
``--accept "rel_l2<=0.2"``: every output of every evaluated sample within rel_l2 0.2 of FP32.

* **aligner**: ``aligner precision det.onnx --target ort:cpu:int8 --calib calib/ --inputs-dir eval/
  --accept "rel_l2<=0.2"`` with its defaults (settings sweep, 200-trial cap), in a child process
  (peak RSS, wall time); its float nodes, trials and verdict from the plan; its QDQ model checked on
  the held-out pages.
* **NNCF**: ``nncf.quantize_with_accuracy_control`` on the same calibration pages, validated on the
  same 4 pages with 1 - (worst rel_l2) and ``max_drop=0.2`` (absolute): the same rule
  (``int8_vs_baselines.run_nncf``, the anchor of the smaller benchmark). Requires nncf 3.4
  (``pip install --no-deps nncf==3.4.0`` plus its small pure-Python dependencies; it needs no torch).

    python benchmarks/int8_det_vs_nncf.py --model /tmp/wheels/ch_PP-OCRv4_det_infer.onnx [--tools aligner,nncf]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_memory import HELDOUT, PRECISION, document_page, measure, ppocr_det  # noqa: E402
from int8_vs_baselines import MeanRelL2, ort_outputs, run_nncf  # noqa: E402


class WorstRelL2(MeanRelL2):
    """The CLI's rule as a number: the worst output rel_l2 over the samples (pass: <= bound)."""

    def value(self, outputs: list[dict]) -> float:
        from aligner.compare.metrics import rel_l2

        return float(max(rel_l2(r[k], o[k]) for r, o in zip(self.reference, outputs) for k in r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ppocr-det", help="ppocr-det (downloaded) or PATH.onnx")
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "aligner-bench" / "wheels"))
    ap.add_argument("--size", default="640x640")
    ap.add_argument("--bound", type=float, default=0.2, help="rel_l2 bound of the acceptance (default 0.2)")
    ap.add_argument("--tools", default="aligner,nncf")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    model = ppocr_det(Path(args.models_dir)) if args.model == "ppocr-det" else Path(args.model).resolve()
    import onnx

    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    out = {"model": model.name, "input": [1, 3, height, width], "accept": f"rel_l2<={args.bound:g}"}
    with tempfile.TemporaryDirectory(prefix="int8-det-nncf-") as tmp:
        tmp = Path(tmp)
        data = {}
        for folder, count, seed in (("calib", 16, 0), ("eval", 4, 10_000), ("heldout", 8, 20_000)):
            (tmp / folder).mkdir()
            data[folder] = [{name: document_page(height, width, seed + i)} for i in range(count)]
            for i, sample in enumerate(data[folder]):
                np.savez(tmp / folder / f"{i:04d}.npz", **sample)
        if "aligner" in args.tools:
            run = tmp / "aligner"
            run.mkdir()
            mib, seconds, error = measure(PRECISION, [str(model), "--target", "ort:cpu:int8", "--calib", str(tmp / "calib"), "--inputs-dir",
                                                      str(tmp / "eval"), "--accept", out["accept"], "--out", "plan.json",
                                                      "--save-model", "det.int8.onnx"], cwd=run)
            row = {"peak_rss_mib": round(mib), "seconds": round(seconds, 1), "error": error}
            stdout = (run / "stdout.txt").read_text().splitlines()
            row["verdict"] = next((s for s in stdout if any(w in s for w in ("PASSED", "NOT VERIFIED", "NO PASSING PLAN"))), "")
            if (run / "plan.json").exists():
                plan = json.loads((run / "plan.json").read_text())
                row.update(float_nodes=len(plan.get("fp32_nodes", [])), trials=plan.get("trials"), passed=plan.get("passed"),
                           quantization={k: plan.get("quantization", {}).get(k) for k in ("tensor_groups", "emulated_runs", "settings")})
            if (run / "det.int8.onnx").exists():
                import subprocess

                proc = subprocess.run([sys.executable, "-c", HELDOUT, str(model), str(run / "det.int8.onnx"), str(tmp / "heldout"),
                                       str(args.bound)], capture_output=True, text=True)
                row["heldout"] = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr[-300:]
            out["aligner"] = row
            print(json.dumps({"aligner": row}), flush=True)
        if "nncf" in args.tools:
            check = WorstRelL2(ort_outputs(str(model), data["eval"]), args.bound)
            result = run_nncf(model, data["calib"], data["eval"], check, full_value=float("nan"))
            qdq = result.pop("model", None)
            if qdq is not None:
                held = WorstRelL2(ort_outputs(str(model), data["heldout"]))
                result["heldout_worst_rel_l2"] = round(held.value(ort_outputs(qdq, data["heldout"])), 4)
            out["nncf"] = result
            print(json.dumps({"nncf": result}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
