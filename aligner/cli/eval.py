"""``aligner eval coco``: COCO mAP and MVRE of a detector on several targets, side by side."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from aligner.backends.target import split_targets
from aligner.cli.common import (add_input_arguments, add_report_arguments, check_writable, emit_run, input_samples, input_source,
                                report_paths, resolve_targets)
from aligner.backends.target import Target
from aligner.errors import InputError
from aligner.eval.adapters import ADAPTERS
from aligner.eval.dataset import CocoDataset, Preprocess
from aligner.eval.run import EvalResult, evaluate_detector, label_map_for
from aligner.search.workers import make_executor
from aligner.graph.model import ModelGraph
from aligner.inputs import parse_input_shapes, write_atomic
from aligner.report.console import fit_table

log = logging.getLogger(__name__)

TOPK_EPILOG = """\
examples:
  aligner eval topk classifier.onnx --images dir/ --targets ort:cpu:fp32,emu:fp16 \\
      --scale 0.00392157 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
  aligner eval topk cls.onnx --images dir/ --input-shapes x:1x3x48x192    # symbolic H, W: the size to feed
  aligner eval topk cls.onnx --inputs samples.npz --targets ort:cpu:fp32,ort:cpu:int8 --calib calib/

inputs: --images are read, resized to --input-size (default: the model's input H, W, or those of
--input-shapes) and normalised; --inputs gives preprocessed arrays instead (an .npz, N first).

exit status: 0 evaluated, 1 a top-1 agreement below --min-top1, 2 usage or input error
"""

EPILOG = """\
With no model, the built-in example runs: the shapes detector (a small transformer detector
that reads raw 0-255 pixels) on the shipped 200-image synthetic val split.

targets: any of aligner's targets, written as everywhere (runtime[:device][:precision][+plan.json]
[@key=value,...]); add +plan to keep a precision plan's nodes in FP32 (e.g. emu:fp16+plan with
--plan plan.json). The first target is the reference of the delta and MVRE columns; each target's
resolved form (plan file, runtime options) is recorded as "spec" in the JSON.

adapters (raw outputs -> detections):
  detr   class logits [B,Q,C+1] + normalized cxcywh boxes [B,Q,4]   (--adapter-outputs logits,boxes)
  boxes  final boxes [B,N,4] (xyxy pixels) + scores [B,N] + labels [B,N]  (--adapter-outputs boxes,scores,labels)
  yolo   rows [B,N,5+C]: cx,cy,w,h (pixels), objectness, class scores; per-class NMS (--adapter-outputs output)

examples:
  aligner eval coco
  aligner eval coco model.onnx --data val2017/ --ann annotations/instances_val2017.json --adapter detr \\
      --input-size 800x800 --scale 0.00392157 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
      --targets ort:cpu:fp32,emu:fp16,emu:fp16+plan --plan plan.json --json eval.json
  aligner eval coco model.onnx ... --targets emu:fp16+plan --plan plan.json --min-ap 0.43   # exit 1 below
  aligner eval coco model.onnx ... --targets ort:cpu:fp32,ort:cpu:int8,ort:cpu:int8+plan.json --calib calib/

exit status: 0 evaluated (and --min-ap met), 1 an AP below --min-ap, 2 usage or input error
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="task accuracy (COCO mAP, MVRE) across targets",
                       description="Evaluate task accuracy across targets.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = kinds.add_parser("coco", help="COCO detection metrics (AP, AP50, AP75, APs/m/l, AR100) and MVRE per output",
                         description="COCO detection metrics per target, with the delta and MVRE vs the first target.",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", nargs="?", help="detector .onnx (default: the built-in example detector)")
    c.add_argument("--no-check", action="store_true", help="skip the ONNX checker when loading")
    c.add_argument("--workers", default="1", metavar="N|ray|ray://HOST:PORT",
                   help="evaluate image shards at once in N local processes (default 1) or on Ray; the metric is computed once "
                        "on the merged detections: the serial result to the last digit")
    c.add_argument("--targets", default="ort:cpu:fp32,emu:fp16", help="comma-separated targets (default ort:cpu:fp32,emu:fp16)")
    c.add_argument("--plan", metavar="PLAN.json", help="precision plan for the +plan targets")
    c.add_argument("--calib", metavar="NPZ|DIR", help="INT8 targets: calibration inputs (.npz or a folder of them; default: the first "
                   "16 evaluation images, with a warning that this overstates accuracy)")
    add_coco_arguments(c, batch=16)
    o = c.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the metrics per target as JSON")
    o.add_argument("--min-ap", type=float, help="exit 1 if any target's AP is below this (e.g. as an --accept-cmd)")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_report_arguments(c)

    t = kinds.add_parser("topk", help="classifier top-1/top-5 agreement with the reference, MVRE of logits",
                         description="Run a classifier on a folder of images on several targets and measure how often each target "
                                     "agrees with the first one (top-1, and reference top-1 within top-5), plus the MVRE of the logits.",
                         epilog=TOPK_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("model", help="classifier .onnx (one image input, logits output)")
    t.add_argument("--no-check", action="store_true", help="skip the ONNX checker when loading")
    t.add_argument("--images", metavar="DIR", help="folder of images (searched recursively); or give preprocessed arrays with --inputs")
    t.add_argument("--output", help="the logits output (default: the first output)")
    t.add_argument("--targets", default="ort:cpu:fp32,emu:fp16", help="comma-separated targets; the first is the reference")
    t.add_argument("--plan", metavar="PLAN.json", help="precision plan for the +plan targets")
    add_input_arguments(t, generated=False)
    _add_preprocess_arguments(t, batch=32)
    to = t.add_argument_group("output")
    to.add_argument("--json", metavar="FILE", help="write the agreement per target as JSON")
    to.add_argument("--min-top1", type=float, help="exit 1 if a target's top-1 agreement is below this")
    to.add_argument("--force", action="store_true", help="overwrite existing output files")


def add_coco_arguments(p: argparse.ArgumentParser, batch: int, group: argparse._ArgumentGroup | None = None,
                       acceptance: bool = False) -> None:
    """The COCO dataset, how to read the outputs and how to preprocess the images: the same flags in
    ``eval coco``, ``precision`` and ``doctor`` (:func:`coco_from_args`); with ``acceptance``, the
    AP drop a precision plan may cost (--max-ap-drop)."""
    d = group or p
    if acceptance:
        d.add_argument("--max-ap-drop", type=float, default=0.005, metavar="AP",
                       help="the plan's acceptance: COCO AP (0-1) at most this below FP32 (default 0.005, half an AP point)")
    d.add_argument("--data", metavar="DIR", help="image folder (val2017 layout)")
    d.add_argument("--ann", metavar="JSON", help="COCO instances JSON")
    d.add_argument("--adapter", choices=sorted(ADAPTERS), help="how to read the outputs (default yolo for the example)")
    d.add_argument("--adapter-outputs", metavar="NAMES", help="comma-separated output names the adapter reads")
    d.add_argument("--example-data", action="store_true", help="the built-in example's val split, adapter and preprocessing (what "
                   "aligner demo evaluates; for the example detector and models made from it)")
    g = _add_preprocess_arguments(p, batch=batch)
    g.add_argument("--label-map", choices=("contiguous", "identity"), default="contiguous",
                   help="model label i -> i-th category id (contiguous) or label = category id")


def coco_from_args(args: argparse.Namespace, graph: ModelGraph, builtin: bool = False, max_drop: float = 0.005):
    """The :class:`~aligner.doctor.task.CocoEval` the COCO flags describe (``builtin``, or
    --example-data: the built-in example's), or None when no dataset is given."""
    from aligner import examples
    from aligner.doctor.task import CocoEval, example_coco

    if builtin or args.example_data:
        if args.data or args.ann:
            raise InputError("--example-data is the built-in example's val split; drop --data and --ann, or drop --example-data.")
        example = example_coco(max_drop, args.batch)
        dataset = CocoDataset(*examples.shapes_val(), limit=args.limit)
        words = [*example.words, *(["--adapter", args.adapter] if args.adapter else []),
                 *(["--adapter-outputs", args.adapter_outputs] if args.adapter_outputs else []),
                 *(["--input-size", args.input_size] if args.input_size else []), *_limit_words(args)]
        return CocoEval(dataset, _adapter(args, False) if args.adapter else example.adapter,
                        _preprocess(args, graph) if args.input_size else example.preprocess, max_drop,
                        label_map_for(dataset.gt, args.label_map), args.batch, tuple(words))
    if not (args.data or args.ann):
        return None
    if not (args.data and args.ann):
        raise InputError("Give the dataset as a pair: --data IMAGE_DIR --ann INSTANCES.json (the val2017 layout).")
    dataset = CocoDataset(Path(args.data), Path(args.ann), limit=args.limit)
    words = ["--data", str(Path(args.data).resolve()), "--ann", str(Path(args.ann).resolve()), "--adapter", args.adapter or ""]
    words += ["--adapter-outputs", args.adapter_outputs] if args.adapter_outputs else []
    words += ["--input-size", args.input_size] if args.input_size else []
    words += ["--resize", args.resize, "--scale", repr(args.scale), "--mean", args.mean, "--std", args.std]
    words += ["--mask-input", args.mask_input] if args.mask_input else []
    words += ["--label-map", args.label_map, *_limit_words(args)]
    if not args.input_size and getattr(args, "input_shapes", None):  # the size --input-shapes gives, said where it is read
        preprocess = _preprocess(args, graph)
        words += ["--input-size", f"{preprocess.size[0]}x{preprocess.size[1]}"]
    return CocoEval(dataset, _adapter(args, False), _preprocess(args, graph), max_drop, label_map_for(dataset.gt, args.label_map),
                    args.batch, tuple(words))


def _limit_words(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--limit", str(args.limit)) if args.limit else ()


def _add_preprocess_arguments(p: argparse.ArgumentParser, batch: int):
    g = p.add_argument_group("preprocessing")
    g.add_argument("--input-size", metavar="HxW", help="model input size (default: from the model's input shape)")
    g.add_argument("--resize", choices=("stretch", "letterbox", "pad"), default="stretch",
                   help="pad: the image at its own size at the top-left of a zero canvas (padded batches, DETR family)")
    g.add_argument("--mask-input", metavar="NAME", help="the model's pixel-mask input (bool [B,H,W], True on padding; with --resize pad)")
    g.add_argument("--scale", type=float, default=1.0, help="pixel multiplier (1 = raw 0-255, 0.00392157 = 0-1)")
    g.add_argument("--mean", default="0,0,0", help="per-channel mean subtracted after scaling")
    g.add_argument("--std", default="1,1,1", help="per-channel std divided by after scaling")
    g.add_argument("--batch", type=int, default=batch, help=f"images per run (default {batch}; 1 for fixed-batch models)")
    g.add_argument("--limit", type=int, help="evaluate the first N images only")
    return g


def run(args: argparse.Namespace) -> int:
    if args.task == "topk":
        return _run_topk(args)
    check_writable([args.json] + report_paths(args), args.force)
    from aligner import examples

    specs = split_targets(args.targets)
    targets = resolve_targets(args, specs)  # a built model: its sidecar's options (args.model: the model)
    builtin = args.model is None and not (args.data or args.ann)
    path = Path(args.model) if args.model else examples.shapes_detector_path()
    graph = ModelGraph.load(path, check=not args.no_check)
    task = coco_from_args(args, graph, builtin)
    if task is None:
        raise InputError("Give the dataset: --data IMAGE_DIR --ann INSTANCES.json (the val2017 layout), or --example-data for "
                         "the built-in example's val split.")
    dataset, adapter, preprocess = task.dataset, task.adapter, task.preprocess
    from aligner.quant.calib import calibrate_targets

    targets, _calib_dir = calibrate_targets(targets, args.calib, dataset, preprocess, graph.input_names[0])  # INT8 targets
    # results are keyed by the targets as the user wrote them, unless the sidecar or calibration changed them
    targets = [spec if Target.parse(spec, plan=args.plan) == t else t for spec, t in zip(specs, targets)]
    console = Console(stderr=True, highlight=False)
    executor = make_executor(args.workers)
    with executor, Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=console, transient=True) as bar:
        task = bar.add_task(f"evaluating {len(targets)} target(s)", total=len(dataset))

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, completed=done)

        result = evaluate_detector(graph, dataset, adapter, preprocess, targets, args.plan,
                                   label_map_for(dataset.gt, args.label_map), args.batch, progress, workers=executor)
    from aligner.report.console import print_workers

    print_workers(executor.stats(), "shard", console)
    print_eval(result)
    if args.json:
        write_atomic(Path(args.json), json.dumps(result.to_dict(), indent=1).encode())
    emit_run(args, "eval", graph, result.to_dict())
    if args.min_ap is not None and any(t.stats["AP"] < args.min_ap for t in result.targets):
        return 1
    return 0


def _run_topk(args: argparse.Namespace) -> int:
    from aligner.eval.topk import evaluate_topk, image_files

    from aligner.quant.calib import with_calibration

    check_writable([args.json], args.force)
    source = input_source(args)
    if not args.images and not source:
        raise InputError("Give the images: --images DIR (read and preprocessed), or --inputs FILE.npz / --inputs-dir DIR "
                         "(preprocessed arrays, N first).")
    targets = resolve_targets(args, split_targets(args.targets))  # a built model: its sidecar's options
    targets = [with_calibration(t, args.calib, source) for t in targets]  # INT8 targets: --calib, else the inputs
    graph = ModelGraph.load(args.model, check=not args.no_check)
    if source:
        if args.images:
            log.warning("--images %s is ignored: %s gives the arrays.", args.images, source)
        images = _topk_arrays(graph, args, args.limit)
        preprocess = None
    else:
        images, preprocess = image_files(args.images, args.limit), _preprocess(args, graph)
    results = evaluate_topk(graph, images, preprocess, [str(t) for t in targets], args.plan, args.batch, args.output)
    console = Console(highlight=False)
    table = Table(title=f"agreement with {escape(results[0].target)} on {len(images)} images", title_justify="left")
    table.add_column("target", overflow="fold")
    for col in ("top-1", "top-5", "MVRE logits", "NaN/inf img", "img/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(escape(r.target), f"{r.top1_agreement:.2%}", f"{r.top5_agreement:.2%}",
                      "" if r is results[0] else f"{r.mvre:.2e}", str(r.nonfinite_images), f"{r.images / r.seconds:.0f}" if r.seconds else "-")
    console.print(fit_table(console, table))
    if args.json:
        doc = {"reference": results[0].target, "images": len(images), "targets": {r.target: r.to_dict() for r in results}}
        write_atomic(Path(args.json), json.dumps(doc, indent=1).encode())
    if args.min_top1 is not None and any(r.top1_agreement < args.min_top1 for r in results):
        return 1
    return 0


def _topk_arrays(graph: ModelGraph, args: argparse.Namespace, limit: int | None) -> np.ndarray:
    """The image input's arrays from --inputs or --inputs-dir (every sample given, N first)."""
    name = graph.input_names[0]
    samples = [s[name] for s in input_samples(graph, args)]
    arrays = np.concatenate(samples) if len(samples) > 1 else samples[0]
    return arrays[:limit] if limit else arrays


def _adapter(args, builtin: bool):
    from aligner import examples

    if builtin and not args.adapter:
        return examples.shapes_adapter()
    if not args.adapter:
        raise InputError(f"Choose how to read the outputs: --adapter {{{','.join(sorted(ADAPTERS))}}}.")
    names = args.adapter_outputs.split(",") if args.adapter_outputs else []
    factory = ADAPTERS[args.adapter]
    try:
        return factory(*names)
    except TypeError:
        raise InputError(f"--adapter-outputs: the {args.adapter} adapter takes at most {factory.__code__.co_argcount} names.") from None


def _preprocess(args, graph: ModelGraph) -> Preprocess:
    if args.input_size:
        try:
            h, w = (int(v) for v in args.input_size.lower().split("x"))
        except ValueError:
            raise InputError(f"--input-size {args.input_size!r}: write HxW, e.g. 800x800.") from None
    else:
        name = graph.input_names[0]
        shape = parse_input_shapes(getattr(args, "input_shapes", None)).get(name) or graph.tensor(name).shape or ()
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
            raise InputError(f"The model's input {name!r} has shape {graph.tensor(name).shape_str()}, which does not say the image "
                             f"size; pass --input-size HxW (or --input-shapes {name}:1x3xHxW).")
        h, w = shape[2], shape[3]
    try:
        mean, std = (tuple(float(v) for v in s.split(",")) for s in (args.mean, args.std))
    except ValueError:
        raise InputError("--mean and --std take three comma-separated numbers (R,G,B).") from None
    if len(mean) != 3 or len(std) != 3:
        raise InputError("--mean and --std take three comma-separated values (R,G,B).")
    return Preprocess((h, w), args.resize, args.scale, mean, std, mask_input=getattr(args, "mask_input", None))


def print_eval(result: EvalResult, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    ref = result.targets[0]
    table = Table(title=f"COCO metrics on {ref.images} images (Δ vs {escape(result.reference)})", title_justify="left")
    table.add_column("target", overflow="fold")
    for col in ("AP", "ΔAP", "AP50", "AR100", "MVRE", "NaN img", "img/s"):
        table.add_column(col, justify="right", no_wrap=col != "MVRE")  # MVRE per output, wrapped at its commas
    for t in result.targets:
        delta = t.stats["AP"] - ref.stats["AP"]
        mvre = ", ".join(f"{v:.1e}" for v in t.mvre.values() if not math.isnan(v)) or "-"
        table.add_row(escape(t.target), f"{t.stats['AP']:.4f}", "" if t is ref else f"{delta:+.4f}", f"{t.stats['AP50']:.3f}",
                      f"{t.stats['AR100']:.3f}", "" if t is ref else mvre, str(t.nonfinite_images),
                      f"{t.images / t.seconds:.0f}" if t.seconds else "-")
    console.print(fit_table(console, table))
