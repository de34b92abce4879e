"""Run a detector over a dataset on several targets: COCO metrics per target, MVRE vs the reference."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner.backends import Runner, make_runner, reference_runner
from aligner.backends.target import REFERENCE, Target
from aligner.errors import InputError
from aligner.eval.adapters import Adapter, Detections, output_mvre
from aligner.eval.coco import STAT_NAMES, CocoStats, coco_image_evals, coco_stats_of_parts, evaluate_coco, gt_index, stats_delta
from aligner.eval.dataset import CocoDataset, Preprocess
from aligner.graph.model import ModelGraph
from aligner.search.executor import Executor, Workers
from aligner.search.workers import make_executor


@dataclass(frozen=True)
class TargetEval:
    target: str  # the target as it was asked for (e.g. "emu:fp16+plan")
    stats: CocoStats
    mvre: dict[str, float]  # per output, vs the reference target
    images: int
    nonfinite_images: int
    seconds: float
    fp32_nodes: int = 0
    spec: str = ""  # the resolved target: str(Target), with the plan file and runtime options

    def to_dict(self, reference: "TargetEval | None" = None) -> dict:
        d = {name: self.stats[name] for name in STAT_NAMES}
        d.update({"spec": self.spec or self.target, "mvre": {k: _num(v) for k, v in self.mvre.items()}, "images": self.images,
                  "nonfinite_images": self.nonfinite_images, "seconds": round(self.seconds, 3), "fp32_nodes": self.fp32_nodes,
                  "images_per_s": round(self.images / self.seconds, 2) if self.seconds else None})
        if reference is not None:
            d["delta"] = {k: _num(v) for k, v in stats_delta(self.stats, reference.stats).items()}
        return d


def _num(v: float):
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class EvalResult:
    model: str
    dataset: str
    reference: str
    targets: tuple[TargetEval, ...]

    def __getitem__(self, target: str) -> TargetEval:
        for t in self.targets:
            if t.target == target:
                return t
        raise KeyError(target)

    def to_dict(self) -> dict:
        ref = self.targets[0]
        return {"model": self.model, "dataset": self.dataset, "reference": self.reference,
                "targets": {t.target: t.to_dict(ref if t is not ref else None) for t in self.targets}}


def label_map_for(gt: dict, kind: str = "contiguous") -> dict[int, int]:
    """Model label -> COCO category id: ``contiguous`` (label i is the i-th category id) or ``identity``."""
    cats = sorted(c["id"] for c in gt["categories"])
    if kind == "identity":
        return {c: c for c in cats}
    if kind == "contiguous":
        return dict(enumerate(cats))
    raise InputError(f"Unknown label map {kind!r}: use contiguous or identity.")


def _map_back(d: Detections, back: tuple[float, float, float, float]) -> Detections:
    sx, sy, px, py = back
    boxes = np.asarray(d.boxes, np.float64).copy()
    boxes[:, 0] = (boxes[:, 0] - px) * sx
    boxes[:, 1] = (boxes[:, 1] - py) * sy
    boxes[:, 2] *= sx
    boxes[:, 3] *= sy
    return Detections(boxes, d.scores, d.labels)


def model_batch(graph: ModelGraph, wanted: int) -> int:
    """The batch to feed: ``wanted``, unless the model's input has a fixed batch dimension."""
    shape = graph.tensor(graph.input_names[0]).shape or ()
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else wanted


def runner_for(graph: ModelGraph, spec: str | Target, plan: str | Path | None = None) -> tuple[Runner, Target]:
    """The runner of a target (``+plan`` keeps the nodes of the plan file ``plan`` in FP32) and the
    resolved target; ort:cpu:fp32 is the reference runner (graph optimizations off)."""
    if plan is not None and not isinstance(plan, (str, Path)):
        if list(plan):
            raise InputError("plan is the plan file of +plan targets (aligner precision --out); for FP32 nodes in hand pass "
                             "Target.parse(spec, pins=nodes) as the target.")
        plan = None
    target = Target.parse(spec, plan=plan)
    if target.base == REFERENCE:
        return reference_runner(graph, target), target
    return make_runner(graph, target), target


def evaluate_detector(
    model: ModelGraph | str | Path,
    dataset: CocoDataset,
    adapter: Adapter,
    preprocess: Preprocess,
    targets: Iterable[str | Target] = ("ort:cpu:fp32", "emu:fp16"),
    plan: str | Path | None = None,
    label_map: Mapping[int, int] | None = None,
    batch: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
    workers: Workers | Executor = 1,
) -> EvalResult:
    """COCO metrics of ``model`` on ``dataset`` for each target; the first target is the reference
    of the Δ and MVRE columns. Targets ending in ``+plan`` keep the nodes of the plan file ``plan``
    in FP32. Results are keyed by each target as given (``emu:fp16+plan``); each records the
    resolved target (plan file, runtime options) as ``spec``.

    ``workers`` (a number of local processes, ``"ray"``, ``"ray://HOST:PORT"`` or an executor:
    :mod:`aligner.search.executor`) runs shards of images at once; the detections and error sums
    are merged in image order and the metric is computed once on them, so the result is the
    serial one to the last digit (only the seconds differ)."""
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    targets = [str(t) for t in targets]
    if not targets:
        raise InputError("Give at least one target, e.g. --targets ort:cpu:fp32,emu:fp16")
    input_name = image_input(graph.input_names, preprocess)
    batch = model_batch(graph, batch)
    label_map = label_map if label_map is not None else label_map_for(dataset.gt)
    runners = [runner_for(graph, t, plan) for t in targets]  # bad targets and plans fail here, before any work
    job = _EvalJob(graph, dataset, adapter, preprocess, targets, plan, dict(label_map), batch, input_name)
    batches = -(-len(dataset) // batch)
    executor, own = (make_executor(workers), True) if isinstance(workers, (int, str)) else (workers, False)
    executor.warm()
    if executor.workers == 1:
        job.runners = [r for r, _ in runners]  # in this process: the runners made above
    dets: dict[str, list] = {t: [] for t in targets}
    nonfinite = dict.fromkeys(targets, 0)
    seconds = dict.fromkeys(targets, 0.0)
    err_sum: dict[str, dict[str, float]] = {t: {} for t in targets}
    err_n: dict[str, dict[str, int]] = {t: {} for t in targets}
    done = 0
    try:
        executor.start(job)
        tickets = [executor.submit(shard) for shard in _shards(batches, executor.workers)]  # a Ray cluster's size is known now
        for ticket in tickets:  # in image order, whatever order the shards finished in
            outcome = executor.result(ticket)
            if outcome.error is not None:
                raise outcome.error
            for part in outcome.value:
                for spec in targets:
                    got = part[spec]
                    dets[spec] += got.detections
                    nonfinite[spec] += got.nonfinite
                    seconds[spec] += got.seconds
                    for name, weighted, n in got.errors:  # the serial running sums, added in the same order
                        err_sum[spec][name] = err_sum[spec].get(name, 0.0) + weighted
                        err_n[spec][name] = err_n[spec].get(name, 0) + n
                done += part.images
                if progress:
                    progress("images", done, len(dataset))
    finally:
        if own:
            executor.close()
    results = []
    for spec, (_, target) in zip(targets, runners):
        stats = evaluate_coco(dataset.gt, dets[spec], image_ids=dataset.image_ids)
        mvre = {k: err_sum[spec][k] / err_n[spec][k] if err_n[spec][k] else math.nan for k in err_sum[spec]}
        results.append(TargetEval(spec, stats, mvre, len(dataset), nonfinite[spec], seconds[spec], len(target.pins), str(target)))
    return EvalResult(str(graph.path or "<in-memory>"), str(dataset.annotations), targets[0], tuple(results))


def _shards(batches: int, workers: int) -> list[range]:
    """Batch ranges in order: one batch each on one worker (progress per batch), else about four
    shards per worker (balance while some run slower)."""
    if workers <= 1:
        return [range(i, i + 1) for i in range(batches)]
    size = max(1, -(-batches // (4 * workers)))
    return [range(i, min(i + size, batches)) for i in range(0, batches, size)]


@dataclass(frozen=True)
class _TargetPart:
    detections: list[dict]
    errors: list[tuple[str, float, int]]  # (output, MVRE x finite elements, finite elements), in output order
    nonfinite: int
    seconds: float


class _Part(dict):
    """One batch: target -> :class:`_TargetPart`, and the number of images."""

    images: int = 0


class _EvalJob:
    """What a worker holds to evaluate shards: the model, dataset and targets; its runners are made
    on its first shard and kept."""

    def __init__(self, graph, dataset, adapter, preprocess, targets, plan, label_map, batch, input_name):
        self.graph, self.dataset, self.adapter, self.preprocess = graph, dataset, adapter, preprocess
        self.targets, self.plan, self.label_map, self.batch, self.input_name = targets, plan, label_map, batch, input_name
        self.runners: list[Runner] | None = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, runners=None)  # sessions stay with each worker (the graph pickles as its model)

    def __call__(self, shard: range) -> list[_Part]:
        if self.runners is None:
            self.runners = [runner_for(self.graph, t, self.plan)[0] for t in self.targets]
        parts = []
        for x, entries, backs in self.dataset.batches(self.preprocess, self.batch, only=shard):
            part, ref_out = _Part(), None
            part.images = len(entries)
            feeds = model_feeds(self.input_name, x, entries, backs, self.preprocess)
            for spec, runner in zip(self.targets, self.runners):
                start = time.perf_counter()
                out = runner.run(feeds)
                took = time.perf_counter() - start
                ref_out = out if ref_out is None else ref_out
                bad = sum(any(not np.all(np.isfinite(np.asarray(v)[k])) for v in out.values() if np.asarray(v).dtype.kind == "f")
                          for k in range(len(entries)))
                dets = _coco_detections(out, entries, backs, self.adapter, self.preprocess, self.label_map)
                part[spec] = _TargetPart(dets, _mvre_terms(ref_out, out), bad, took)
            parts.append(part)
        return parts


def coco_acceptance(dataset: CocoDataset, adapter: Adapter, preprocess: Preprocess, reference: Runner,
                    max_drop: float = 0.005, label_map: Mapping[int, int] | None = None, batch: int = 50):
    """An ``Acceptance`` for ``aligner precision``: a trial passes when its COCO AP is at most
    ``max_drop`` below the reference's (AP is 0-1: 0.005 = half an AP point). Its task metric is a
    :class:`CocoTask`, which a trial on several workers splits over shards of the images."""
    from aligner.search.precision import Acceptance

    label_map = label_map if label_map is not None else label_map_for(dataset.gt)
    task = CocoTask(dataset, adapter, preprocess, dict(label_map), batch, max_drop)
    task.ref_ap = task.ap(task.detect(reference))
    return Acceptance(threshold=math.inf, task=task, task_name=f"COCO AP drop <= {max_drop:g} (reference AP {task.ref_ap:.4f})")  # rule: finite


class CocoTask:
    """``task(runner)``: '' when the runner's COCO AP is at most ``max_drop`` below ``ref_ap``, else why not.

    It splits (:mod:`aligner.search.trial_job`): ``pieces`` batches of images; ``part(runner, shard)``
    runs a range of them and matches their detections (pycocotools' per-image evaluation:
    :func:`~aligner.eval.coco.coco_image_evals`), ``merge(parts)`` accumulates the parts in image
    order into AP — the numbers ``task(runner)`` computes, to the last digit, with the per-image
    work done where the parts ran."""

    def __init__(self, dataset: CocoDataset, adapter: Adapter, preprocess: Preprocess, label_map: dict[int, int], batch: int,
                 max_drop: float, ref_ap: float = math.nan):
        self.dataset, self.adapter, self.preprocess, self.label_map = dataset, adapter, preprocess, label_map
        self.batch, self.max_drop, self.ref_ap = batch, max_drop, ref_ap
        self._gt = None  # pycocotools' index of the ground truth, built once per process

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _gt=None)

    @property
    def pieces(self) -> int:
        return -(-len(self.dataset) // self.batch)

    def detect(self, runner: Runner, shard: range | None = None) -> list[dict]:
        """COCO detections of the batches ``shard`` (all when None), in image order."""
        dets, name = [], image_input(runner.input_names, self.preprocess)
        for x, entries, backs in self.dataset.batches(self.preprocess, self.batch, only=shard):
            dets += _coco_detections(runner.run(model_feeds(name, x, entries, backs, self.preprocess)), entries, backs, self.adapter,
                                     self.preprocess, self.label_map)
        return dets

    def ap(self, dets: list[dict]) -> float:
        return evaluate_coco(self.dataset.gt, dets, image_ids=self.dataset.image_ids)["AP"]

    def judge(self, ap: float) -> str:
        return "" if ap >= self.ref_ap - self.max_drop else (f"AP {ap:.4f} is {self.ref_ap - ap:.4f} below the reference {self.ref_ap:.4f} "
                                                             f"(allowed {self.max_drop:g})")

    def __call__(self, runner: Runner) -> str:
        return self.judge(self.ap(self.detect(runner)))

    def _index(self):
        if self._gt is None:
            self._gt = gt_index(self.dataset.gt)
        return self._gt

    def part(self, runner: Runner, shard: range) -> tuple[int, dict]:
        """(detections, per-image evaluations) of the batches ``shard``."""
        dets = self.detect(runner, shard)
        ids = self.dataset.image_ids[shard.start * self.batch:shard.stop * self.batch]
        return len(dets), coco_image_evals(self.dataset.gt, dets, ids, self._index())

    def stats_of(self, parts: list[tuple[int, dict]]) -> CocoStats:
        """COCO stats of the parts of every batch: :func:`evaluate_coco`'s on all their detections."""
        return coco_stats_of_parts(self.dataset.gt, [evals for _, evals in parts], self.dataset.image_ids, sum(n for n, _ in parts),
                                   self._index())

    def merge(self, parts: list[tuple[int, dict]]) -> str:
        return self.judge(self.stats_of(parts)["AP"])


def image_input(input_names, preprocess: Preprocess) -> str:
    """The image input: the model's only input, or the one beside ``preprocess.mask_input``."""
    names = list(input_names)
    mask = preprocess.mask_input
    if mask is not None and mask not in names:
        raise InputError(f"The pixel-mask input {mask!r} is not an input of the model; its inputs are {names}.")
    rest = [n for n in names if n != mask]
    if len(rest) != 1:
        raise InputError(f"aligner eval feeds one image tensor (and a pixel mask with --mask-input); this model has inputs {names}.")
    return rest[0]


def model_feeds(image: str, x: np.ndarray, entries: list[dict], backs: list, preprocess: Preprocess) -> dict[str, np.ndarray]:
    """One batch's feeds: the images, and the pixel masks of padded batches (``preprocess.mask_input``)."""
    feeds = {image: x}
    if preprocess.mask_input:
        feeds[preprocess.mask_input] = np.stack([preprocess.pixel_mask(e["width"], e["height"], b) for e, b in zip(entries, backs)])
    return feeds


def _coco_detections(out: dict, entries: list[dict], backs: list, adapter: Adapter, preprocess: Preprocess,
                     label_map: Mapping[int, int]) -> list[dict]:
    """One batch of raw outputs as COCO detections in original image coordinates."""
    dets = []
    for entry, d, back in zip(entries, adapter(out, [preprocess.size] * len(entries)), backs):
        dets += _map_back(d, back).to_coco(entry["id"], label_map)
    return dets


def _mvre_terms(ref: dict, out: dict) -> list[tuple[str, float, int]]:
    """One batch's share of the running MVRE per output over all images: :func:`output_mvre`
    weighted by finite elements, and that count."""
    terms = []
    for name, r in ref.items():
        r, t = np.asarray(r), np.asarray(out[name])
        if r.dtype.kind != "f" or r.shape != t.shape:
            continue
        n = int((np.isfinite(r) & np.isfinite(t)).sum())
        if n:
            terms.append((name, output_mvre(r, t) * n, n))
    return terms


__all__ = ["CocoTask", "EvalResult", "TargetEval", "coco_acceptance", "evaluate_detector", "image_input", "label_map_for", "model_batch", "model_feeds",
           "runner_for"]
