"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from aligner.backends.resolve import resolve_target as library_resolve, with_sidecar
from aligner.backends.target import REFERENCE, Target
from aligner.compare.metrics import METRICS
from aligner.compare.tolerance import Tolerance, defaults_text, parse_clause, parse_tolerance, tolerance_for
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import load_inputs, make_inputs, parse_input_shapes, save_inputs, validate_feeds

log = logging.getLogger(__name__)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _at_least(parse, low, strict: bool, what: str):
    """An argparse type: ``parse(text)``, refused below ``low`` (or at it, when ``strict``)."""
    def check(text: str):
        value = parse(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} {'>' if strict else '>='} {low}")
        return value
    return check


non_negative_float = _at_least(finite_float, 0, False, "a number")
positive_float = _at_least(finite_float, 0, True, "a number")
non_negative_int = _at_least(_whole, 0, False, "a whole number")
positive_int = _at_least(_whole, 1, False, "a whole number")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to the .onnx model (external-data and >2 GiB models work)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX checker when loading")


def _runtimes_help() -> str:
    """One paragraph per registered runtime, from its descriptor (aligner.backends.registry)."""
    import textwrap

    from aligner.backends.registry import backends

    return "\n".join(textwrap.fill(b.help, 98, initial_indent="  ", subsequent_indent="    ") for b in backends().values() if b.help)


TARGETS_HELP = f"""\
targets: runtime[:device][:precision][+plan.json][@key=value,...]
{_runtimes_help()}
  INT8 quantizer settings as options: @calibrate=minmax|entropy|percentile,types=u8s8|s8s8,
  reduce_range=0|1,per_channel=1|0,symmetric=0|1,fallback=fp32|fp16 (fp16: what stays unquantized
  runs in FP16). Tensors are compared dequantized, by their original names.
  +plan.json keeps a plan's nodes in FP32 (+plan: the file given with --plan); --fp32-nodes adds
  nodes; @key=value (or --target-option) sets runtime options, e.g. ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC.
  A plan replays what it was verified with or refuses (exit 2): the model it was searched on (content
  hash) and, INT8, its quantizer settings and calibration data (not --inputs; --calib must hold the same).
  A target means the same in compare, bisect, precision, eval, bench and build.

tolerance: one rule for every command and strategy. A tensor diverges when its NaN/inf pattern
  differs from the reference, or when --metric (default rel_l2) is beyond --threshold AND max_abs
  exceeds --atol. Defaults by the lower precision of target and reference, also for --target-model
  comparisons: {defaults_text()} (threshold/atol);
  giving only --atol or only --threshold keeps the other default. The verdict prints the rule.
"""


def add_target_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """--target, --reference, --target-model, pins and options, as every comparing command takes them."""
    g = p.add_argument_group("target")
    g.add_argument("--target", help="target to check (default emu:fp16; ort:cpu:fp32 with --target-model); see 'targets' below")
    g.add_argument("--reference", default=REFERENCE, help=f"reference (default {REFERENCE}, graph optimizations off)")
    g.add_argument("--target-model", metavar="ONNX",
                   help=f"{verb} a second graph (edited, simplified) against the model on the reference runtime; tensors and nodes matched by name")
    g.add_argument("--fp32-nodes", metavar="NAMES", help="comma-separated nodes kept FP32 in a low-precision target (added to the target's pins)")
    g.add_argument("--plan", metavar="PLAN.json", help="keep a precision plan's nodes in FP32 (same as TARGET+PLAN.json)")
    g.add_argument("--target-option", action="append", metavar="KEY=VALUE", default=[],
                   help="a runtime option of the target (repeatable), e.g. cudnn_conv_algo_search=HEURISTIC")


def add_input_arguments(p: argparse.ArgumentParser, generated: bool = True, calib: bool = True) -> argparse._ArgumentGroup:
    """The one input group of every command that runs the model: --inputs, --inputs-dir,
    --input-shapes and (``calib``) --calib; with ``generated`` the seed of generated inputs and
    --save-inputs. Symbolic dims take their sizes from the data given (--input-shapes only for
    generated inputs, or checked against the data)."""
    g = p.add_argument_group("inputs")
    g.add_argument("--inputs", metavar="FILE", help="input values: .npz, or Polygraphy's JSON (polygraphy run --save-inputs)")
    g.add_argument("--inputs-dir", metavar="DIR", help="several input samples: every .npz (or Polygraphy .json) in DIR, by name; "
                   "a command that runs one sample uses the first, precision searches on all")
    g.add_argument("--input-shapes", nargs="+", metavar="NAME:DIMS", help="shapes for symbolic dims of generated inputs, e.g. "
                   "images:1x3x800x800 (with --inputs the sizes come from the data)")
    if calib:
        g.add_argument("--calib", metavar="NPZ|DIR", help="INT8 targets: calibration inputs for ONNX Runtime's quantizer (an .npz, or "
                       "a folder of .npz files); without it the command's inputs are used, which overstates accuracy")
    if generated:
        g.add_argument("--seed", type=int, default=0, help="seed of the generated random inputs (default 0)")
        g.add_argument("--save-inputs", metavar="FILE", help="write the inputs used (.npz, or .json in Polygraphy's format)")
    return g


def input_source(args: argparse.Namespace) -> str | None:
    """The file or folder the inputs come from (None: generated); --inputs and --inputs-dir together are refused."""
    inputs, folder = getattr(args, "inputs", None), getattr(args, "inputs_dir", None)
    if inputs and folder:
        raise InputError(f"--inputs {inputs} and --inputs-dir {folder} both give the inputs; give one of them.")
    return inputs or folder


def input_samples(graph: ModelGraph, args: argparse.Namespace, save: bool = True) -> list[dict]:
    """Every input sample the command was given (--inputs: each sample of the file; --inputs-dir:
    every file's), checked against the model, else one generated sample (--input-shapes, --seed);
    written to --save-inputs when asked."""
    from aligner.inputs import load_inputs_dir

    shapes = parse_input_shapes(getattr(args, "input_shapes", None))
    if getattr(args, "inputs_dir", None) or getattr(args, "inputs", None):
        source = input_source(args)
        loaded = load_inputs_dir(source) if getattr(args, "inputs_dir", None) else load_inputs(source)
        samples = [validate_feeds(graph, s) for s in loaded]
        for name, dims in shapes.items():  # sizes come from the data; --input-shapes may only agree with it
            got = tuple(samples[0][name].shape) if name in samples[0] else None
            if got is not None and got != tuple(dims):
                raise InputError(f"--input-shapes {name}:{'x'.join(map(str, dims))} disagrees with the data in {source} "
                                 f"({name} is {'x'.join(map(str, got)) or 'scalar'}); the data's sizes are used: drop --input-shapes.")
    else:
        samples = [make_inputs(graph, shapes, seed=getattr(args, "seed", 0))]
    if save and getattr(args, "save_inputs", None):  # whatever their source: what the command ran on
        save_inputs(samples, args.save_inputs, force=getattr(args, "force", False))
    return samples


def resolve_feeds(graph: ModelGraph, args: argparse.Namespace) -> dict:
    """The one sample a command runs: the first of :func:`input_samples` (said on stderr when there are more)."""
    samples = input_samples(graph, args, save=False)
    if len(samples) > 1:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"note: {len(samples)} input samples given; this command runs the first (aligner precision and doctor search on all).")
    if getattr(args, "save_inputs", None):
        save_inputs(samples[:1], args.save_inputs, force=getattr(args, "force", False))
    return samples[0]


def inputs_record(args: argparse.Namespace, samples: list[dict]) -> dict:
    """What a run was given (:func:`aligner.inputs.inputs_summary`), for its run directory and the report."""
    from aligner.inputs import inputs_summary

    return inputs_summary(samples, input_source(args), getattr(args, "seed", 0))


class OutputDir(str):
    """An output path that is a directory (a run directory), for :func:`check_writable`."""


def check_writable(paths: list[str | None], force: bool) -> None:
    """Claim a command's outputs before any work: two outputs of one command on the same path, a
    file output that is a directory or lies below a file, and an existing file or non-empty
    directory without --force are refused, each with what to do."""
    seen: dict[Path, str] = {}
    for path in [p for p in paths if p]:
        p = Path(path)
        key = p.resolve()
        if key in seen:
            raise InputError(f"{path} is given for two outputs of this command ({seen[key]} and this one); give each its own path.")
        seen[key] = str(path)
        blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
        if blocker is not None:
            raise InputError(f"{path}: {blocker} is a file, so nothing can be written below it; choose another path.")
        if isinstance(path, OutputDir):
            if p.exists() and not p.is_dir():
                raise InputError(f"{path} is a file, not a run directory; choose a directory path.")
            if p.is_dir() and any(p.iterdir()) and not force:
                raise InputError(f"{path} exists and holds files; pass --force to replace them, or choose another directory.")
            continue
        if p.is_dir():
            raise InputError(f"{path} is a directory; give a file path for this output.")
        if p.exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite it.")


def add_tolerance_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("tolerance")
    t.add_argument("--metric", choices=sorted(METRICS), default="rel_l2", help="metric of the divergence rule (default rel_l2)")
    t.add_argument("--threshold", type=finite_float, help=f"divergence threshold (default per precision, threshold/atol: {defaults_text()})")
    t.add_argument("--atol", type=non_negative_float, help="ignore errors whose max_abs is at most this (default per precision, as above)")


def resolve_target(args: argparse.Namespace) -> Target:
    """The target of a comparing command: the library's one resolution
    (:func:`aligner.backends.resolve.resolve_target`) of --target (default: the target a built
    model's sidecar names, else the FP16 emulator, or the reference runtime when a second graph is
    given), --plan, --fp32-nodes, --target-option, --calib and the sidecar's options."""
    pins = [n.strip() for n in (getattr(args, "fp32_nodes", None) or "").split(",") if n.strip()]
    return library_resolve(args.target, plan=getattr(args, "plan", None), pins=pins,
                           options=parse_options(getattr(args, "target_option", None) or []), calib=getattr(args, "calib", None),
                           inputs=input_source(args), second_graph=bool(getattr(args, "target_model", None)),
                           sidecar=model_sidecar(args), say=_say)


def _say(text: str) -> None:
    """A resolution line on stderr, specs left copyable (no wrapping, no markup)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(escape(text))


def model_sidecar(args: argparse.Namespace):
    """The sidecar of ``args.model`` when it is a built model (``MODEL.json`` beside it) or the
    sidecar itself, read once; given the sidecar, ``args.model`` becomes the model it describes."""
    if not hasattr(args, "_sidecar"):
        from aligner.backends.resolve import read_sidecar

        sidecar = read_sidecar(args.model) if getattr(args, "model", None) else None
        if sidecar is not None:
            if sidecar.kind != "onnx":
                raise InputError(f"{sidecar.path} describes a TensorRT engine ({sidecar.model}); this command takes the ONNX model.")
            args.model = str(sidecar.model)
            if sidecar.target.is_quantized:
                log.warning("%s is a built INT8 (QDQ) model: it runs as built; a comparison of it shows the runtime's error on the "
                            "QDQ model, not quantization's. To measure the build, compare the original on the target it was built "
                            "for (the same quantization): aligner compare original.onnx --target %s", sidecar.model.name, sidecar.target)
            elif sidecar.target.precision not in ("fp32", "tf32"):
                log.warning("%s is a built %s model: the reference runs this built model as it is, so a comparison shows the runtime's "
                            "error on it, not the build's; to measure the build, compare the original: aligner compare original.onnx "
                            "--target-model %s --target %s", sidecar.model.name, sidecar.target.precision.upper(), sidecar.model.name,
                            sidecar.target.base)
        args._sidecar = sidecar
    return args._sidecar


def resolve_targets(args: argparse.Namespace, specs: list[str | Target] | None) -> list[Target]:
    """Several targets of one command (bench, eval): ``specs`` (None: none given, so the sidecar's
    target itself) parsed with ``--plan``, each taking a built model's sidecar options as
    :func:`aligner.backends.resolve.with_sidecar` says, said on stderr."""
    sidecar = model_sidecar(args)
    plan = getattr(args, "plan", None)
    if specs is None:
        if sidecar is None:
            raise InputError("No target given; pass --target.")
        return [library_resolve(None, sidecar=sidecar, say=_say)]
    return [with_sidecar(Target.parse(s, plan=plan), sidecar, _say) for s in specs]


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--target-option {item!r}: write KEY=VALUE, e.g. cudnn_conv_algo_search=HEURISTIC.")
        out[key.strip()] = value.strip()
    return out


def tolerance_from_args(args: argparse.Namespace, target: Target) -> Tolerance:
    """The verdict rule of this run: the one policy (:func:`tolerance_for`) with the user's
    --metric/--threshold/--atol, and precision's --accept clauses and --accept-cmd on top."""
    base = tolerance_for(target, Target.parse(getattr(args, "reference", REFERENCE)), args.metric, args.threshold, args.atol)
    specs, command = getattr(args, "accept", None) or [], getattr(args, "accept_cmd", None)
    whole = [s for s in specs if parse_clause(s, base)[0] is None]  # clauses that set the rule of every output
    if whole and (args.threshold is not None or args.metric != "rel_l2"):
        raise InputError(f"--accept {whole[0]!r} and --metric/--threshold both set the rule of every output; give one of them "
                         "(--accept 'rel_l2<=5e-3' is --metric rel_l2 --threshold 5e-3).")
    return parse_tolerance(specs, base, command) if specs or command else base


def load_models_and_feeds(args: argparse.Namespace) -> tuple[ModelGraph, ModelGraph | None, dict]:
    """The model, the optional --target-model, and the inputs, as every comparing command reads them."""
    graph = ModelGraph.load(args.model, check=not args.no_check)
    other = ModelGraph.load(args.target_model, check=not args.no_check) if args.target_model else None
    return graph, other, resolve_feeds(graph, args)


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--report", metavar="HTML", help="write a self-contained HTML report of this run (its run directory goes beside it)")
    g.add_argument("--run", metavar="DIR", help="write the run directory (JSON results for `aligner report`) here")


def report_paths(args: argparse.Namespace) -> list[str | None]:
    """Output paths the report options will write (for the --force check before any work): the
    HTML report and the run directory (``--run``, else beside the report)."""
    if not (args.report or args.run):
        return []
    return [args.report, OutputDir(args.run or Path(args.report).with_suffix(".run"))]


def emit_run(args: argparse.Namespace, kind: str, graph: ModelGraph, result: dict, trials: Path | None = None,
             samples: list[dict] | None = None) -> None:
    """Write the run directory (with what ``samples`` were given, :func:`inputs_record`) and render the
    report when --run / --report ask for them."""
    if not (args.report or args.run):
        return
    from aligner.report import write_report, write_run

    run_dir = Path(args.run) if args.run else Path(args.report).with_suffix(".run")
    write_run(run_dir, kind, graph, result, trials, force=getattr(args, "force", False),
              inputs=inputs_record(args, samples) if samples else None)
    if args.report:
        write_report([run_dir], args.report, force=getattr(args, "force", False))
        print(f"report: {args.report} (run directory {run_dir})")


def load_torch_factory(spec: str):
    """``MODULE:FUNCTION`` -> the nn.Module it returns; clear errors for what does not import."""
    import importlib

    from aligner.errors import unknown_name_message

    module_name, _, func = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--torch {spec}: cannot import {module_name!r} ({exc}). Make it importable (PYTHONPATH) "
                         "and write MODULE:FUNCTION.") from None
    if not func or not callable(getattr(module, func, None)):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise InputError(unknown_name_message("factory", func or "(none)", names) + f" (in module {module_name!r})")
    return getattr(module, func)()
