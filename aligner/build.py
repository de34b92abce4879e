"""``build``: the deployable model of a target — a mixed-precision ONNX for ONNX Runtime (``ort:*``)
or a TensorRT engine (``trt:*``) — checked before it is written, with a sidecar JSON saying how.

1. Graph passes first (``fuse``), checked against the original on ort:cpu:fp32: nothing is written
   if an output moved beyond FP32 tolerance.
2. FP16/BF16 targets: aligner's precision rewrite with the target's FP32 pins (explicit Casts at
   every boundary: the form ONNX Runtime, strongly typed TensorRT 10.12+/11 and TensorRT-RTX take),
   checked against the FP32 model on the emulator with the same pins under the one verdict rule
   (:func:`build_rule`: the given rule, else the plan's recorded one, else the precision's default;
   each output judged as compare judges it). INT8 builds are checked the same way on their integer
   kernels (:mod:`aligner.quant.check`). A build that fails
   the check is not written unless ``write_anyway``; ``force`` only allows overwriting files.
3. ``tuning`` (ort:* targets): the runtime options are measured on the built model
   (:func:`aligner.tune.tune`: the candidates side by side, the fastest that passes the accuracy
   check kept) and the target carries the winners.
4. The model or engine, and ``<output>.json`` beside it (the **sidecar**): the target in full (plan
   file, runtime options, tuned ones included), the check, the tuning (every candidate: options,
   median ms, spread, status and reason), the passes, the engine's build settings. A low-precision
   ONNX build is stamped (metadata ``aligner.precision``) so runners take it as built.
   ``ort_optimized`` also writes ONNX Runtime's optimized graph for the target's provider and options.

:func:`read_sidecar` reads a sidecar back (given the model or the JSON): bench, eval, compare and
bisect run a built model with the options it was built with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from aligner.backends.replay import check_replay
from aligner.backends import backend_of, backends, check_target
from aligner.backends.resolve import Sidecar, read_sidecar, sidecar_path  # noqa: F401 - written here, read there
from aligner.backends.target import REFERENCE, Target, plan_doc
from aligner.compare import compare
from aligner.compare.tolerance import Tolerance, parse_clause, parse_tolerance, tolerance_for
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.graph.precision import BUILT_PRECISION, Overflow, rewrite_precision
from aligner.inputs import make_inputs, validate_feeds, write_atomic
from aligner.tune import Progress, TuneResult, TuneSettings, check_tunable, tune


@dataclass(frozen=True)
class FuseStep:
    name: str  # the pass (aligner plugins list)
    replaced: int  # patterns replaced
    skipped: tuple[str, ...] = ()  # patterns left as they are, with why


@dataclass(frozen=True)
class BuildCheck:
    """A low-precision build's outputs against the FP32 model (on the emulator with the same pins,
    or INT8's check target), judged by one verdict rule."""

    on: str  # the target the build was checked on
    tolerance: Tolerance  # the rule every output was judged by (:func:`build_rule`)
    worst_rel_l2: float
    diverging: tuple[str, ...]  # outputs whose NaN/inf pattern or metric breaks the rule

    @property
    def passed(self) -> bool:
        return not self.diverging

    def rule(self) -> str:
        return self.tolerance.describe()

    def to_dict(self) -> dict:
        return {"on": self.on, "tolerance": self.tolerance.to_dict(), "rule": self.rule(),
                "worst_rel_l2": _num(self.worst_rel_l2), "diverging": list(self.diverging), "passed": self.passed}


@dataclass(frozen=True)
class BuildResult:
    target: Target
    output: str
    kind: Literal["onnx", "engine"]
    written: bool
    check: BuildCheck | None = None  # None: an FP32/TF32 build, nothing to check
    fused: tuple[FuseStep, ...] = ()
    pinned: int = 0  # nodes kept FP32 by the target's pins
    auto_pinned: int = 0  # nodes kept FP32 because their op has no low-precision kernel
    casts_inserted: int = 0
    overflows: tuple[Overflow, ...] = ()  # weights beyond the low type's range
    sidecar: str | None = None
    ort_optimized: str | None = None
    engine: Mapping | None = None  # trt: module, version, bytes, strongly_typed, outputs
    unmatched_pins: tuple[str, ...] = ()  # trt --layer-precision: pins no layer carries
    notes: tuple[str, ...] = ()
    tuning: TuneResult | None = None  # the runtime options measured (build --tune); target carries the chosen ones
    quantization: Mapping | None = None  # INT8: ONNX Runtime's quantizer, its settings, calibration, the nodes kept in float

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed

    def to_dict(self) -> dict:
        from aligner.version import __version__

        pins = sorted(self.target.pins)
        return {"aligner": __version__, "target": self.target.to_dict(), "output": self.output, "kind": self.kind,
                "written": self.written, "check": self.check.to_dict() if self.check else None,
                "plan": {"fp32_nodes": pins, "sha256": hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]},
                "fused": [{"pass": f.name, "replaced": f.replaced, "skipped": list(f.skipped)} for f in self.fused],
                "auto_pinned": self.auto_pinned, "casts_inserted": self.casts_inserted,
                "overflows": [{"tensor": o.tensor, "max_abs": o.max_abs, "count": o.count} for o in self.overflows],
                "ort_optimized": self.ort_optimized, "engine": dict(self.engine) if self.engine else None,
                "unmatched_pins": list(self.unmatched_pins), "notes": list(self.notes),
                "tuning": self.tuning.to_dict() if self.tuning else None, "quantization": self.quantization}


def build_outputs(output: str | Path, ort_optimized: str | Path | None = None) -> list[Path]:
    """Every file a build writes (checked before any work: they exist only with ``force``)."""
    return [Path(output), sidecar_path(output)] + ([Path(ort_optimized)] if ort_optimized else [])


def build_target(target: str | Target, plan: str | Path | None = None) -> Target:
    """The target of a build, checked before any work: ort:* or trt:*, runtime options it takes,
    and for trt:* an importable TensorRT (a missing one says what to install)."""
    target = check_target(Target.parse(target, plan=plan))
    runtime = backend_of(target)
    if runtime.build is None:
        models = " and ".join(f"{b.title} ({name}:*)" for name, b in backends().items() if b.build == "onnx")
        engines = ", ".join(f"{name}:*" for name, b in backends().items() if b.build == "engine")
        deployed = runtime.deploys_as(target)
        raise InputError(f"Target {target}: aligner build writes models for {models} or engines ({engines}); {runtime.title} "
                         f"is not built here{': ' + runtime.not_built if runtime.not_built else ''}."
                         + (f" Build for {deployed.base}." if deployed is not None and deployed != target and backend_of(deployed).build else ""))
    if runtime.build_check is not None:
        runtime.build_check(target)  # option values too (threads=x), the runtime's library: before any work
    return target


def build(model: ModelGraph | str | Path, target: str | Target, output: str | Path, *, plan: str | Path | None = None,
          fuse: Iterable[str] = (), check_inputs: Mapping[str, np.ndarray] | None = None,
          input_shapes: Mapping[str, tuple[int, ...]] | None = None, write_anyway: bool = False, force: bool = False,
          ort_optimized: str | Path | None = None, plugins: Sequence[str] = (), layer_precision: bool = False,
          tuning: TuneSettings | None = None, progress: Progress | None = None, tolerance: Tolerance | None = None) -> BuildResult:
    """Build ``model`` for ``target`` into ``output`` (see the module docstring).

    ``plan`` is the file a ``+plan`` target refers to; ``check_inputs`` the inputs of the checks
    (default: generated, with ``input_shapes`` for symbolic dims — real data reaches the ranges that
    overflow, random data may not); ``input_shapes`` also fixes a TensorRT engine's dynamic inputs;
    ``plugins`` are TensorRT plugin libraries; ``layer_precision`` takes TensorRT <= 10's per-layer
    precision path; ``tuning`` measures the runtime options (ort:* targets, :mod:`aligner.tune`;
    ``progress`` gets its lines); ``tolerance`` is the rule of the check and of tuning (default:
    :func:`build_rule`). ``result.written`` says whether the files were written,
    ``result.passed`` whether the check passed."""
    target = build_target(target, plan)
    if tuning is not None:
        check_tunable(target)
    writes = backend_of(target).build
    if writes != "engine" and (layer_precision or plugins):
        raise InputError(f"Target {target}: --layer-precision and --plugins are TensorRT build settings (trt:* targets).")
    if ort_optimized and writes != "onnx":
        raise InputError(f"Target {target}: --ort-optimized writes ONNX Runtime's optimized graph (ort:* targets).")
    _check_writable(build_outputs(output, ort_optimized), force)
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    check_replay(graph, target)  # a plan builds only the model it was verified on (INT8: with its calibration), or exit 2
    feeds = validate_feeds(graph, dict(check_inputs)) if check_inputs is not None else make_inputs(graph, dict(input_shapes or {}))
    graph, fused, notes = _fused(graph, list(fuse), feeds)
    rule, note = build_rule(target, tolerance)
    notes += [note] if note else []
    if writes == "engine":
        return _build_engine(graph, target, Path(output), feeds, fused, notes, input_shapes, plugins, layer_precision, write_anyway, rule)
    return _build_onnx(graph, target, Path(output), feeds, fused, notes, ort_optimized, write_anyway, rule, tuning, progress)


def build_rule(target: Target, tolerance: Tolerance | None = None) -> tuple[Tolerance, str]:
    """(the rule a build is checked and tuned by, a note or ''): ``tolerance`` when given, else the
    rule the target's plan was verified with (its recorded clauses, atol the precision's default
    where a clause has none), else the precision's default (:func:`tolerance_for`, as compare's).
    A plan also accepted by a command or task metric, which a build cannot re-run, gets a note."""
    if tolerance is not None:
        return tolerance, ""
    base = tolerance_for(target)
    if not target.plan:
        return base, ""
    bounds, other = [], []
    for clause in (str(c) for c in plan_doc(target.plan).get("accept") or []):
        try:
            parse_clause(clause, base)
            bounds.append(clause)
        except InputError:
            other.append(clause)
    if not bounds:  # a plan accepted by its task alone: finiteness is what the build can check
        bounds = ["finite"]
    note = (f"the plan was also accepted by {'; '.join(other)}, which the build cannot re-run: re-run it on the built model"
            if other else "")
    try:
        return parse_tolerance(bounds, base), note
    except InputError:  # an older aligner recorded several rules for every output (e.g. rel_l2 and cosine): the first one
        rule = parse_tolerance(bounds[:1], base)
        return rule, "; ".join(n for n in (note, f"plan {target.plan} records several rules for every output ({'; '.join(bounds)}): "
                                                  f"the build checks the first, {rule.describe()}") if n)


def _build_onnx(graph: ModelGraph, target: Target, output: Path, feeds, fused, notes, ort_optimized, write_anyway: bool,
                rule: Tolerance, tuning: TuneSettings | None = None, progress: Progress | None = None) -> BuildResult:
    base = BuildResult(target, str(output), "onnx", False, fused=fused, notes=tuple(notes))
    if target.precision in ("fp32", "tf32"):
        model, result = graph.model, base
    elif target.is_quantized:
        model, result = _quantized(graph, target, feeds, base, rule)
        if not result.passed and not write_anyway:
            return result
        model.metadata_props.add(key=BUILT_PRECISION, value="int8")  # runners take it as built
    else:
        rewrite = rewrite_precision(graph, target.pins, target.precision)
        result = _with_rewrite(base, rewrite, check_build(graph, target, feeds, rule))
        model = rewrite.model
        if not result.passed and not write_anyway:
            return result
        model.metadata_props.add(key=BUILT_PRECISION, value=target.precision)  # runners take it as built
    if tuning is not None:
        tuned = tune(ModelGraph(model, graph.path), target, reference=graph, feeds=feeds, tolerance=rule, settings=tuning, progress=progress)
        target = tuned.target
        result = replace(result, target=target, tuning=tuned)
    from aligner.plugin import has_plugins

    if ort_optimized and has_plugins(model):
        raise InputError("--ort-optimized: the model has aligner plugin ops, which ONNX Runtime runs through onnxruntime-extensions "
                         "custom ops; its optimized file would hold that session-only form. Ship the mixed model itself.")
    write_atomic(output, model.SerializeToString())
    if ort_optimized:
        from aligner.backends.ort.runner import save_optimized

        save_optimized(output, _session(target), ort_optimized)
    return _finish(replace(result, written=True, ort_optimized=str(ort_optimized) if ort_optimized else None))


def _build_engine(graph: ModelGraph, target: Target, output: Path, feeds, fused, notes, input_shapes, plugins,
                  layer_precision: bool, write_anyway: bool, rule: Tolerance) -> BuildResult:
    from aligner.backends.trt.engine import build_engine

    result = BuildResult(target, str(output), "engine", False, fused=fused, notes=tuple(notes))
    if target.is_quantized:  # the QDQ model: its Q/DQ say where the strongly typed engine runs INT8
        model, result = _quantized(graph, target, feeds, result, rule)
        if not result.passed and not write_anyway:
            return result
        from aligner.quant.quantize import engine_target

        graph, target = ModelGraph(model, graph.path), engine_target(target)
    elif target.precision != "fp32":
        rewrite = rewrite_precision(graph, target.pins, target.precision)
        result = _with_rewrite(result, rewrite, check_build(graph, target, feeds, rule))
        if not result.passed and not write_anyway:
            return result
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    from aligner.backends.trt.engine import TRT_OPTIONS

    engine = build_engine(graph, target.precision, target.pins, shapes, plugins=plugins, layer_precision=layer_precision,
                          options={k: v for k, v in target.options if k in TRT_OPTIONS})  # not capture=, a comparison's option
    write_atomic(output, engine.data)
    described = {"module": engine.module, "version": engine.version, "bytes": len(engine.data), "strongly_typed": not layer_precision,
                 "outputs": list(engine.outputs), "input_shapes": {k: list(v) for k, v in shapes.items()}, "plugins": list(plugins)}
    return _finish(replace(result, written=True, engine=described, unmatched_pins=tuple(engine.unmatched_pins)))


def check_build(graph: ModelGraph, target: Target, feeds, rule: Tolerance | None = None) -> BuildCheck:
    """The low-precision build of ``target`` against FP32 under ``rule`` (default: :func:`build_rule`),
    each output judged as compare judges it: on the emulator with the same pins, or for INT8 on
    :func:`aligner.quant.check.checked_on`."""
    from aligner.backends import make_runner, reference_runner
    from aligner.search.acceptance import check_outputs

    rule = rule or build_rule(target)[0]
    if target.is_quantized:
        from aligner.quant.check import checked_on

        on = checked_on(target)
    else:
        on = Target("emu", "cpu", target.precision, target.pins)
    reference, got = reference_runner(graph).run(feeds), make_runner(graph, on).run(feeds)
    worst: dict[str, float] = {}
    diverging = tuple(n for n in graph.output_names if check_outputs(rule, {n: reference[n]}, {n: got[n]}, worst))
    return BuildCheck(on.base, rule, float(worst.get("rel_l2", 0.0)), diverging)


def _session(target: Target) -> Target:
    """The target ONNX Runtime's session options are read from: an INT8 target's without its quantizer settings."""
    if not target.is_quantized:
        return target
    from aligner.quant.quantize import session_target

    return session_target(target)


def _quantized(graph: ModelGraph, target: Target, feeds, result: BuildResult, rule: Tolerance):
    """The QDQ model of an INT8 target (ONNX Runtime's quantizer, the target's settings and calibration,
    its pins kept in float) and ``result`` with its check and quantization record."""
    from aligner.quant.quantize import quantize

    if not target.option_dict.get("calib"):
        raise InputError(f"Target {target}: an INT8 build needs calibration data: --calib FILE.npz|DIR/ with representative inputs "
                         "(calibrating on generated inputs would ship ranges of random data).")
    quantized = quantize(graph, target)  # loaded afresh: ours to stamp
    model = quantized.model
    return model, replace(result, check=check_build(graph, target, feeds, rule), pinned=len(target.pins),
                          quantization=quantized.to_dict())


def _with_rewrite(result: BuildResult, rewrite, check: BuildCheck) -> BuildResult:
    return replace(result, check=check, pinned=len(rewrite.pinned), auto_pinned=len(rewrite.auto_pinned),
                    casts_inserted=rewrite.casts_inserted, overflows=tuple(rewrite.overflows))


def _finish(result: BuildResult) -> BuildResult:
    """Write the sidecar beside the output (the build as recorded) and say where it is."""
    result = replace(result, sidecar=str(sidecar_path(result.output)))
    write_atomic(sidecar_path(result.output), json.dumps(result.to_dict(), indent=1).encode())
    return result


def _fused(graph: ModelGraph, names: list[str], feeds) -> tuple[ModelGraph, tuple[FuseStep, ...], list[str]]:
    """Apply the passes ``names``; the result is checked against the original on ort:cpu:fp32."""
    if not names:
        return graph, (), []
    from aligner.passes import PASSES

    for name in names:
        if name not in PASSES:
            raise InputError(f"--fuse {name!r}: unknown pass; available: {', '.join(PASSES)}.")
    fused, steps = graph, []
    for name in names:
        result = PASSES[name](fused)
        fused = ModelGraph(result.model, graph.path)
        steps.append(FuseStep(name, len(result.fused), tuple(result.skipped)))
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.nodes if n.domain in ("mmcv", "mmdeploy")})
    if foreign:  # the original itself cannot run on ONNX Runtime: nothing to check against
        return fused, tuple(steps), [
            f"the original has {', '.join(foreign)} nodes, which ONNX Runtime cannot run without their own custom-op library, "
            "so the fused model was not compared with it (the plugin's reference is tested against mmcv's semantics); run "
            "aligner compare with both models where that library is loaded."]
    check = compare(graph, target=REFERENCE, target_model=fused, feeds=feeds, tensors=graph.output_names)
    if check.first_divergent is not None:
        raise InputError(f"--fuse changed the outputs beyond FP32 tolerance ({check.verdict()}); not written.")
    worst = max((t.metrics.get("rel_l2", 0.0) for t in check.tensors), default=0.0)
    return fused, tuple(steps), [f"fused model checked against the original on {REFERENCE}: outputs rel_l2 <= {worst:.2g}"]


def _check_writable(paths: list[Path], force: bool) -> None:
    for path in paths:
        if path.exists() and not force:
            raise InputError(f"{path} exists; pass --force to overwrite it (force=True).")


def _num(value: float):
    return value if np.isfinite(value) else None


__all__ = ["BuildCheck", "BuildResult", "FuseStep", "Sidecar", "build", "build_outputs", "build_rule", "build_target", "check_build",
           "read_sidecar", "sidecar_path"]
