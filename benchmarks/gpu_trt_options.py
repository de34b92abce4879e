"""TensorRT builder options recorded with the build (issue 18, last item), on the build path that runs here.

    source .gpu/bin/env.sh && ALIGNER_TENSORRT=tensorrt_rtx PYTHONPATH=.:$PYTHONPATH \
        python benchmarks/gpu_trt_options.py --out /tmp/trt && cp /tmp/trt/trt_options.* /tmp/trt/first_build.engine.json $OUT/

On the example detector (with its committed plan), through ``aligner build`` in this process:

1. What this TensorRT knows: its TacticSource names, the builder config's defaults (optimisation
   level, tactic-source mask, workspace limit).
2. ``--target trt:fp16+plan.json@builder_optimization_level=L,tactic_sources=S,workspace_mb=W,timing_cache=C``
   built twice with the same timing cache (the first build writes it, the second reads it), then
   once without a cache: build seconds each time, the cache file's size, and the sidecar's
   record of the settings.
3. Bad values (an unknown tactic source, a non-numeric workspace) and the error each gives.

Writes trt_options.json and trt_options.md (and the first build's sidecar) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aligner.cli.main import main as aligner  # noqa: E402
from aligner.examples import shapes_detector_path  # noqa: E402

PLAN = ROOT / "datasets" / "shapes_detector.plan.json"


def knows() -> dict:
    """The module, its TacticSource names and the builder config's defaults."""
    from aligner.backends.trt.engine import load_tensorrt

    trt = load_tensorrt()
    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    sources = getattr(trt, "TacticSource", None)
    names = sorted(n for n in dir(sources) if n.isupper()) if sources is not None else []
    doc = {"module": trt.__name__, "version": trt.__version__, "tactic_sources": {n: int(getattr(sources, n)) for n in names},
           "has_set_tactic_sources": hasattr(config, "set_tactic_sources")}
    for key, get in (("default_builder_optimization_level", lambda: config.builder_optimization_level),
                     ("default_tactic_mask", lambda: int(config.get_tactic_sources())),
                     ("default_workspace_bytes", lambda: int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)))):
        try:
            doc[key] = get()
        except Exception as exc:  # noqa: BLE001 - what this TensorRT lacks is the finding
            doc[key] = f"{type(exc).__name__}: {exc}"
    return doc


def build(label: str, spec: str, output: Path, argv_extra: list[str] = ()) -> dict:
    argv = ["build", str(shapes_detector_path()), "--target", spec, "--input-shapes", "pixels:1x3x128x128",
            "-o", str(output), "--force", *argv_extra]
    print(f"\n== {label}\naligner {' '.join(argv)}", flush=True)
    start, err = time.perf_counter(), io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = aligner(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
    seconds = time.perf_counter() - start
    print(err.getvalue(), end="", file=sys.stderr, flush=True)
    sidecar = output.with_name(output.name + ".json")
    side = json.loads(sidecar.read_text()) if rc == 0 and sidecar.exists() else None
    print(f"exit {rc} in {seconds:.2f} s", flush=True)
    return {"label": label, "command": "aligner " + " ".join(argv[:1] + ["shapes_detector.onnx"] + argv[2:]), "exit": rc,
            "seconds": round(seconds, 3), "engine_bytes": output.stat().st_size if rc == 0 and output.exists() else None,
            "sidecar_target": side and side.get("target"), "sidecar_engine": side and side.get("engine"),
            "stderr": err.getvalue()[-1500:] if rc else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--level", type=int, default=5, help="builder_optimization_level of the timed builds")
    ap.add_argument("--workspace-mb", type=int, default=1024)
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"  # the engines and the timing cache
    work.mkdir(exist_ok=True)
    doc = {"knows": knows(), "builds": [], "errors": []}
    print(json.dumps(doc["knows"], indent=1), flush=True)
    names = list(doc["knows"]["tactic_sources"])
    cache = work / "timing.cache"
    # the plan in the spec (+plan.json), not --plan: the CLI appends --plan's "+plan" after the @options
    fp16 = f"trt:fp16+{PLAN.relative_to(ROOT)}"
    opts = f"@builder_optimization_level={args.level},workspace_mb={args.workspace_mb},timing_cache={cache}"
    if names and doc["knows"]["has_set_tactic_sources"]:
        opts += ",tactic_sources=" + "+".join(names)
    spec = fp16 + opts
    for label in ("first build (cache written)", "second build (cache read)"):
        row = build(label, spec, work / "shapes.engine")
        row["cache_bytes_after"] = cache.stat().st_size if cache.exists() else None
        doc["builds"].append(row)
        if row["exit"] == 0 and len(doc["builds"]) == 1:
            (out / "first_build.engine.json").write_text((work / "shapes.engine.json").read_text())
    no_cache = fp16 + opts.replace(f",timing_cache={cache}", "")
    doc["builds"].append(build("no timing cache", no_cache, work / "nocache.engine"))
    doc["builds"].append(build("TensorRT's defaults (no options)", fp16, work / "defaults.engine"))
    for label, bad in (("unknown tactic source", "trt:fp16@tactic_sources=CUBLAS+NOPE"),
                       ("workspace not a number", "trt:fp16@workspace_mb=lots"),
                       ("optimisation level out of range", "trt:fp16@builder_optimization_level=9"),
                       ("two @ (options are one @key=value,key=value)", "trt:fp16@workspace_mb=512@builder_optimization_level=3")):
        row = build(label, bad, work / "bad.engine")
        doc["errors"].append(row)
    (out / "trt_options.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "trt_options.md").write_text(markdown(doc))
    print("\n" + markdown(doc))


def markdown(doc: dict) -> str:
    k = doc["knows"]
    lines = [f"{k['module']} {k['version']}: TacticSource names {', '.join(k['tactic_sources']) or 'none'}; "
             f"set_tactic_sources {'present' if k['has_set_tactic_sources'] else 'absent'}; defaults: optimisation level "
             f"{k.get('default_builder_optimization_level')}, tactic mask {k.get('default_tactic_mask')}, workspace "
             f"{k.get('default_workspace_bytes')} bytes.", "",
             "| build | exit | seconds | engine bytes | timing cache bytes after | sidecar target options |", "|---|---|---|---|---|---|"]
    for b in doc["builds"]:
        options = (b.get("sidecar_target") or {}).get("options")
        lines.append(f"| {b['label']} | {b['exit']} | {b['seconds']:.2f} | {b.get('engine_bytes')} | {b.get('cache_bytes_after', '—')} | "
                     f"`{json.dumps(options)}` |")
    lines += ["", "Errors:", ""] + [f"* {e['label']}: exit {e['exit']}: `{' '.join(e['stderr'].split())[:400]}`"
                                                                for e in doc["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
