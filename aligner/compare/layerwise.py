"""Layer-wise comparison: capture tensors on a reference and a target, diff them one by one.

Tensors are captured in groups sized by a memory budget. Each group runs on the reference, then
on the target, is diffed and dropped; only the metrics are kept, so peak memory is about one group
of tensors per side, not the model's. ``store_dir`` also writes the reference values to disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from aligner.backends import Runner, backend_of, make_runner, reference_runner
from aligner.backends.resolve import target_for_model
from aligner.backends.target import REFERENCE, Target
from aligner.compare.capture import Observer, Perturbation, fusion_dependence
from aligner.compare.metrics import NonFinite, measure, nonfinite_counts
from aligner.compare.results import CompareResult, TensorDiff
from aligner.compare.store import DiskStore
from aligner.compare.tolerance import Tolerance, nonfinite_differs, tolerance_for
from aligner.errors import AlignerError, InputError, unknown_name_message
from aligner.graph.model import ModelGraph, concrete_shapes, numpy_dtype
from aligner.inputs import Feeds, make_inputs, validate_feeds

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)
UNKNOWN_SIZE = 4 * 2**20


def plan_groups(names: Sequence[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Split ``names`` (in order) into consecutive groups whose estimated bytes fit ``budget``."""
    groups, current, used = [], [], 0
    for name in names:
        size = sizes.get(name, UNKNOWN_SIZE)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        groups.append(current)
    return groups


def estimate_sizes(graph: ModelGraph, feeds: Feeds) -> dict[str, int]:
    infos = concrete_shapes(graph, {k: v.shape for k, v in feeds.items()})
    sizes = {}
    for name, info in infos.items():
        if info.shape is not None and all(isinstance(d, int) for d in info.shape) and info.elem_type:
            sizes[name] = int(np.prod(info.shape, dtype=np.int64)) * numpy_dtype(info.elem_type).itemsize
    return sizes


@dataclass(frozen=True)
class Diff:
    """One tensor judged against its reference: metrics, NaN/inf counts, the verdict and why."""

    metrics: dict[str, float]
    nonfinite_ref: NonFinite
    nonfinite_target: NonFinite
    diverges: bool
    reason: str  # "", "metric", "nonfinite", "values" (integers), "shape ..."

    @property
    def new_nonfinite(self) -> bool:
        return self.nonfinite_target.total > 0 and self.nonfinite_ref.total == 0


def diff_tensor(ref: np.ndarray | list, test: np.ndarray | list, tol: Tolerance) -> Diff:
    """``test`` judged against ``ref``. A sequence value (SequenceConstruct, SplitToSequence) is judged
    as its elements laid end to end, once its length and every element's shape match."""
    if isinstance(ref, (list, tuple)) or isinstance(test, (list, tuple)):
        if _layout(ref) != _layout(test):
            return Diff({}, NonFinite(), NonFinite(), True, f"sequence of shapes {_layout(ref)} vs {_layout(test)}")
        ref, test = _end_to_end(ref), _end_to_end(test)
    empty = [v is None or (isinstance(v, np.ndarray) and v.dtype == object and v.ndim == 0 and v.item() is None) for v in (ref, test)]
    if any(empty):  # an optional without a value (ONNX Runtime hands it back as None): nothing to compare
        return Diff({}, NonFinite(), NonFinite(), not all(empty),
                    "empty optional on both sides: not compared" if all(empty) else "optional empty on one side only")
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        return Diff({}, nonfinite_counts(ref), nonfinite_counts(test), True, f"shape {ref.shape} vs {test.shape}")
    if ref.dtype.kind in "OSU" or test.dtype.kind in "OSU":  # string tensors: equal or not (no metric applies)
        differs = bool(np.any(ref.astype(str) != test.astype(str)))
        return Diff({}, NonFinite(), NonFinite(), differs, "values" if differs else "")
    metrics, nf_ref, nf_test = measure(ref, test)
    if nonfinite_differs(ref, test, nf_ref, nf_test):
        return Diff(metrics, nf_ref, nf_test, True, "nonfinite")
    if ref.dtype.kind in "biu" or test.dtype.kind in "biu":
        differs = bool(np.any(ref != test))
        return Diff(metrics, nf_ref, nf_test, differs, "values" if differs else "")
    exceeded = tol.exceeded(metrics)
    return Diff(metrics, nf_ref, nf_test, exceeded, "metric" if exceeded else "")


def _layout(value) -> tuple:
    """A sequence value's element shapes (a plain tensor: its shape, marked as such)."""
    return tuple(np.shape(v) for v in value) if isinstance(value, (list, tuple)) else ("tensor", np.shape(value))


def _end_to_end(value: list | tuple) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in value]) if len(value) else np.zeros(0, np.float32)


def compare(
    model: ModelGraph | str | Path,
    target: str | Target | None = None,
    reference: str | Target = REFERENCE,
    target_model: ModelGraph | str | Path | None = None,
    feeds: Feeds | None = None,
    tensors: Iterable[str] | None = None,
    tolerance: Tolerance | None = None,
    capture_budget_mb: int = 512,
    store_dir: str | Path | None = None,
    progress: Progress | None = None,
    segments: bool = True,
) -> CompareResult:
    """Run ``model`` on ``reference`` and ``target`` (or ``target_model`` on the reference runtime)
    and compare every tensor (or ``tensors``) in topological order. ``tolerance`` defaults to
    :func:`~aligner.compare.tolerance.tolerance_for` the two targets, as in every command. When
    the tensors need more than one capture group, ``segments`` cuts the model so each side runs
    every node once (:mod:`aligner.compare.segments`); otherwise each group runs the whole model.
    ``target`` None: a built model's own target (its sidecar, whose runtime options a target of the
    same runtime also takes, as on the command line), else emu:fp16 (ort:cpu:fp32 with ``target_model``)."""
    check_budget(capture_budget_mb)
    tgt_target, model = target_for_model(target, model, second_graph=target_model is not None)  # a built model: its sidecar's target
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    ref_target = Target.parse(reference)
    other = graph
    if target_model is not None:
        other = target_model if isinstance(target_model, ModelGraph) else ModelGraph.load(target_model)
    feeds = validate_feeds(graph, feeds) if feeds is not None else make_inputs(graph)
    tol = tolerance or tolerance_for(tgt_target, ref_target)

    ref_runner = reference_runner(graph, ref_target)
    from aligner.quant.runner import matched_qdq

    qdq = matched_qdq(graph, other, tgt_target)  # a QDQ model of this graph: read through its Q/DQ pairs, in graph's names
    tgt_runner: Runner = qdq or make_runner(other, tgt_target)
    view = graph if qdq is not None else other  # the graph whose tensor names the target answers in
    notes = []
    # the observer first: on TensorRT its layer information decides what is capturable
    segmentable = segments and target_model is None and tensors is None and _segmentable(tgt_target)
    # segments need the uncaptured run only at the end: it runs meanwhile (in the sandbox's child)
    observer = Observer.of(tgt_runner, view, feeds, background=segmentable)
    observer.reference = lambda: ref_runner.run(feeds)  # asked once, only if a capture run moves the target's outputs
    if backend_of(tgt_target).capture_default(tgt_target) == "boundaries" and tensors is None and observer.policy == "outputs":
        notes.append(f"{backend_of(tgt_target).title} target with capture=outputs: the outputs are compared (capture=boundaries "
                     "compares every tensor its executed kernels write)")
    names, unmatched = _select(graph, view, tgt_runner, tensors)
    sizes = estimate_sizes(graph, feeds)
    groups = plan_groups(names, sizes, int(capture_budget_mb * 2**20) // 2)  # half per side
    log.info("comparing %d tensors in %d capture group(s)", len(names), len(groups))
    notes += observer.notes(unmatched)

    # Interleaved: each group is captured on the reference, then on the target, diffed and
    # dropped, so at most one group per side is alive. ``store_dir`` keeps the reference values.
    store = DiskStore(Path(store_dir)) if store_dir is not None else None
    diffs = None
    if segmentable and len(groups) > 1:
        try:
            diffs, outputs = _segmented(graph, names, sizes, int(capture_budget_mb * 2**20) // 2, ref_target, tgt_target, tgt_runner,
                                        observer, feeds, tol, store, progress)
        except Exception as exc:  # noqa: BLE001 - a piece the runtime will not take on its own: the whole model still runs
            log.warning("capturing in segments failed (%s); capturing in whole-model groups instead", exc)
            diffs = None
        # the same rule as every capture run (the uncaptured run's error, if any, is raised here): cutting the graph may change
        # ONNX Runtime's kernels, and with them FP32 rounding, but must not change any verdict
        moved = observer.check.moved(outputs, tol) if diffs is not None and observer.check is not None else None
        if moved:
            log.info("segmented capture moved the target's outputs (%s): capturing in whole-model groups instead", moved.why)
            diffs = None
    for i, group in enumerate(groups if diffs is None else []):
        diffs = diffs or []
        ref_values = ref_runner.run(feeds, group)
        tgt_values, moved = observer.capture(tgt_runner, feeds, group, tol)
        for name in group:
            ref_value = ref_values.pop(name)
            if store is not None:
                store.put(name, ref_value)
            diffs.append(observer.label(diff_row(graph, name, ref_value, tgt_values.pop(name), tol), moved))
        del ref_values, tgt_values
        if progress:
            progress("capture", i + 1, len(groups))
    diffs = diffs or []
    if store is not None:
        store.flush()
    if target_model is None and not any(d.blamed for d in diffs) and tensors is None:
        notes += [n for n in [fusion_dependence(graph, tgt_target, feeds, observer, tol)] if n]

    label = str(tgt_target) if target_model is None else target_label(tgt_target, other)
    return CompareResult(
        reference=str(ref_target),
        target=label,
        model=str(graph.path or "<in-memory>"),
        target_model=None if target_model is None else str(other.path or "<in-memory>"),
        tolerance=tol,
        tensors=tuple(diffs),
        unmatched=tuple(n for n in unmatched if n not in observer.absorbed),
        notes=tuple(notes),
        capture=observer.policy,
        kernels=tuple(observer.fused),
        absorbed=tuple(n for n in unmatched if n in observer.absorbed),
    )


def _segmentable(target: Target) -> bool:
    """Targets whose segments compute what the whole model computes: the FP16/BF16 emulator (it rounds
    each stored tensor, so FP32 carries of rounded values are exact) and ONNX Runtime in FP32/TF32.
    Not ONNX Runtime in FP16/BF16 (a segment's FP32 inputs and outputs let its optimizer keep values
    in FP32 that overflow FP16 in the whole model) nor INT8 (each segment would be quantized anew)."""
    return backend_of(target).segmentable(target)


def _segmented(graph: ModelGraph, names: list[str], sizes: dict[str, int], budget: int, ref_target: Target, tgt_target: Target,
               tgt_runner: Runner, observer: Observer, feeds: Feeds, tol: Tolerance, store, progress: Progress | None) -> tuple[list | None, dict]:
    """Every tensor in one pass per side, the model cut into segments (:mod:`aligner.compare.segments`),
    and the target's graph outputs from the last segment; (None, {}) when no cut is allowed."""
    from dataclasses import replace

    from aligner.compare.segments import Cuts, plan_segments, run_segments

    capturable, cuts = tgt_runner.capturable, Cuts(graph)
    segments = plan_segments(graph, names, sizes, budget, lambda crossing: all(t in capturable for t in crossing), cuts=cuts)
    if len(segments) < 2:
        return None, {}
    log.info("comparing %d tensors in %d segment(s), one pass per side", len(names), len(segments))
    wanted = set(names)
    pins = set(tgt_target.pins)
    if backend_of(tgt_target).sandboxed(tgt_target):
        # The pieces run here while the whole model runs uncaptured in the sandbox (the check): shipping every captured
        # tensor out of the child cost more than computing it (DETR-R50: 3 GB). A runtime that crashes on the model
        # crashes the uncaptured run first in practice; the reference and the emulator always run here.
        tgt_target = tgt_target.with_options({"sandbox": "0"})

    def target_of(sub: ModelGraph) -> Runner:
        return make_runner(sub, replace(tgt_target, pins=tuple(p for p in tgt_target.pins if p in sub.node_by_name), plan=None)
                           if pins else tgt_target)

    diffs, last, done = [], {}, set()
    for i, (ref_values, tgt_values) in enumerate(run_segments(graph, segments, [lambda sub: reference_runner(sub, ref_target), target_of], feeds, cuts)):
        for name in [n for n in ref_values if n in wanted and n not in done]:
            done.add(name)
            ref_value = ref_values.pop(name)
            if store is not None:
                store.put(name, ref_value)
            diffs.append(observer.label(diff_row(graph, name, ref_value, tgt_values[name], tol), Perturbation()))
        last = tgt_values
        if progress:
            progress("capture", i + 1, len(segments))
    return diffs, last


def _select(graph: ModelGraph, other: ModelGraph, runner: Runner, tensors: Iterable[str] | None) -> tuple[list[str], list[str]]:
    candidates = graph.activations()
    if tensors is not None:
        wanted = list(tensors)
        for name in wanted:
            if name not in graph.tensors:
                raise InputError(unknown_name_message("tensor", name, candidates))
        candidates = [n for n in candidates if n in set(wanted)] + [n for n in wanted if n in graph.input_names]
    in_other = set(other.tensors)
    names = [n for n in candidates if n in in_other and n in runner.capturable]
    unmatched = [n for n in candidates if n not in in_other or n not in runner.capturable]
    return names, unmatched


def target_label(target: Target, other: ModelGraph) -> str:
    """How a two-model comparison names its target side: the runtime and the second model's file."""
    return f"{target} ({Path(str(other.path)).name if other.path else 'target model, in memory'})"


def check_budget(capture_budget_mb: float) -> None:
    """0 captures one tensor per group; negative or non-finite budgets are refused."""
    if not isinstance(capture_budget_mb, (int, float)) or not 0 <= capture_budget_mb < float("inf"):
        raise InputError(f"capture budget must be a number of MB >= 0 (0: one tensor per run); got {capture_budget_mb!r}.")


def diff_row(graph: ModelGraph, name: str, ref: np.ndarray, test: np.ndarray, tol: Tolerance) -> TensorDiff:
    d = diff_tensor(ref, test, tol.for_output(name))  # a graph output with its own rule (as precision's acceptance judges it)
    node = graph.producer.get(name)
    return TensorDiff(
        tensor=name,
        node=node.name if node is not None else "",
        op_type=node.op_type if node is not None else "Input",
        index=graph.index_of[node.name] if node is not None else -1,
        shape=(len(ref),) if isinstance(ref, (list, tuple)) else tuple(np.shape(ref)),
        dtype=(f"sequence({np.asarray(ref[0]).dtype if len(ref) else '?'})" if isinstance(ref, (list, tuple)) else str(np.asarray(ref).dtype)),
        metrics=d.metrics,
        nonfinite_ref=d.nonfinite_ref,
        nonfinite_target=d.nonfinite_target,
        diverges=d.diverges,
        reason=d.reason,
    )
