"""INT8 in the pin search: a pin is a node kept in float (excluded from ONNX Runtime's quantizer).

ONNX Runtime quantizes a tensor when any node next to it is quantized, so the search moves by
*tensors*: each quantized tensor gives a group (the nodes that must all stay float for it to stay
unquantized), ranked by the tensor's own share of the output error, measured on one switchable
emulated model (:mod:`aligner.quant.switch`: no quantizer call, one run per tensor). Trials — each
one quantized by ONNX Runtime and run on the target's real kernels — find the shortest passing
prefix of that ranking (doubling, then halving), then prove the plan 1-minimal node by node. Nodes
whose integer kernel loses accuracy that Q/DQ does not (isolated on the target) come first. The
quantizer settings may first be swept. Trials and the plan are :mod:`aligner.search.precision`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from aligner.backends import reference_runner
from aligner.backends.target import Target
from aligner.compare.metrics import HIGHER_IS_BETTER
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds


def quantizable(graph: ModelGraph, target: Target) -> list[str]:
    """Nodes the quantizer quantizes for ``target`` (a Q/DQ on an input or output), topological order:
    what keeping a node in float can change."""
    from aligner.quant.match import QdqMap
    from aligner.quant.quantize import quantize

    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = set(QDQRegistry) | set(QLinearOpsRegistry)  # what the quantizer quantizes (a Shape reading a DQ output is not)
    qmap = QdqMap(graph, quantize(graph, target, exclude=()).model)
    # A Relu/Clip folded into its producer's output Q/DQ counts too: keep the producer in float and it
    # reappears with Q/DQ of its own (on the wider pre-activation), unless it is kept in float as well.
    return [n.name for n in graph.nodes if n.op_type in ops and (
        (n.name in qmap.nodes and (u := qmap.unit(n.name)) is not None and len(u.nodes) > 1)
        or (n.name not in qmap.nodes and n.op_type in ("Relu", "Clip") and qmap.folded_into(n.name) is not None))]


def quantization_seeds(graph: ModelGraph, target: Target, feeds: Feeds, universe: Sequence[str],
                       capture_budget_mb: float = 512) -> tuple[dict[str, str], list[str]]:
    """Nodes whose own quantization error (isolated on ``target``, reference inputs) exceeds the INT8
    tolerance, with the evidence, largest first; and those among them whose error is the integer
    kernel's (small with Q/DQ in float): emulation cannot rank them, so the search tries them first.
    The isolation runs hold about ``capture_budget_mb`` of tensors (half per side, as compare's)."""
    from aligner.compare.tolerance import tolerance_for
    from aligner.search.isolate import isolate, kernel_or_quantization

    tol = tolerance_for(target)
    errors = isolate(graph, list(universe), feeds, reference_runner(graph), target.with_pins(()), tol,
                     budget_bytes=int(capture_budget_mb * 2**20) // 2)
    ranked = sorted((e for e in errors if e.node in set(universe) and e.metrics), key=lambda e: rank_key(e, tol.metric), reverse=True)
    seeds, kernel = {}, []
    for e in (e for e in ranked if e.diverges):
        why = f"own quantization error {tol.metric} {e.metrics.get(tol.metric, math.nan):.3g} (isolated on {target.base}, tolerance {tol.threshold:g})"
        if kernel_or_quantization(e, tol) == "kernel":
            why += (f"; with Q/DQ in float it is only {e.metrics.get('emulated_' + tol.metric, math.nan):.3g}: ONNX Runtime's integer "
                    "kernel loses it, not quantization (try reduce_range=1)")
            kernel.append(e.node)
        seeds[e.node] = why
    return seeds, kernel


def rank_key(error, metric: str) -> tuple[float, float]:
    """Rank key: the worst channel's rel_l2 (what per-tensor quantization destroys and a whole-tensor
    metric hides), then the tolerance metric."""
    value = error.metrics.get(metric, 0.0)
    value = math.inf if math.isnan(value) else value
    return error.metrics.get("channel_rel_l2", 0.0), -value if metric in HIGHER_IS_BETTER else value


def quantizer_settings(graph: ModelGraph, target: Target, samples: Sequence[Feeds], accept, sweep: bool, executor=None,
                       reference: Sequence[dict] | None = None) -> tuple[Target, dict]:
    """The INT8 target to search on (the sweep's best setting when ``sweep``) and what to record in the plan.
    Calibrates first (every method the sweep tries, in one streaming pass); then ``executor`` (if given)
    is started with :class:`QuantizedTrialJob` — the sweep's settings and every later trial run on it."""
    from aligner.backends.replay import calibration_record, verification
    from aligner.quant.quantize import CALIBRATE, QuantSettings, calibrate_ranges, calibration_of, calibration_state, quantizable_model

    record: dict = {"quantizer": "onnxruntime.quantization.quantize_static (QDQ)"}
    _, opset_note, _ = quantizable_model(graph)
    if opset_note:
        record["opset"] = opset_note
    inert = constant_weights(graph)
    if inert:
        record["weights"] = (f"{len(inert)} Conv/MatMul/Gemm weight(s) are Constant nodes' outputs, not initializers: ONNX Runtime's "
                             "quantizer quantizes them as activations (one calibrated scale each), so per_channel and reduce_range "
                             "do not apply to them")
    base = QuantSettings.of(target)
    calibrate_ranges(graph, target, CALIBRATE if sweep else (base.calibrate,))  # every method's ranges in one streaming pass
    if executor is not None:  # its workers get the ranges, not the data: they never calibrate
        executor.start(QuantizedTrialJob(graph, target, samples, reference, accept, calibration_state(graph, target)))
    if sweep:
        from aligner.quant.sweep import candidate_settings, sweep_settings

        candidates = candidate_settings(base, reduce_range=(base.reduce_range,) if inert else (False, True))  # reduce_range: weights only
        target, points = sweep_settings(graph, target, samples, accept.metric, candidates, executor, reference)
        record["sweep"] = [p.to_dict() for p in points]
    record["settings"] = QuantSettings.of(target).to_dict()
    # what +plan.json replays (aligner.backends.replay): the data's path and content hash, the model and samples
    record["calibration"] = {**calibration_of(graph, target).to_dict(), **calibration_record(target)}
    record["verified"] = verification(graph, samples)  # the plan's "verified" block (PrecisionPlan takes it from here)
    return target, record


class QuantizedTrialJob:
    """The INT8 search's job on a trial executor (:mod:`aligner.search.executor`), loaded once per worker:

    * ``("sweep", options, metric)`` -> the worst ``metric`` of the whole model quantized with those
      quantizer options (:func:`aligner.quant.sweep.full_int8_error`);
    * ``("rank", options, universe, batches, indices)`` -> the emulated shares of those quantized tensors
      (:meth:`aligner.quant.switch.SwitchableQdq.shares`), the switches built here as the search built them;
    * ``("trial", options, task)`` -> what :class:`~aligner.search.trial_job.TrialJob` gives for ``task``
      (a pin set kept in float, or a part of its trial) under those options.

    It carries the calibration's computed ranges (:class:`aligner.quant.quantize.CalibrationState`),
    installed in the worker's cache before its first task: a worker never reads the calibration data
    or calibrates, and quantizes exactly as the search's own process does."""

    def __init__(self, graph: ModelGraph, target: Target, samples: Sequence[Feeds], reference: Sequence[dict], accept, state):
        self.graph, self.target, self.samples, self.reference, self.accept, self.state = graph, target, list(samples), list(reference), accept, state
        self._jobs: dict = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_jobs": {}}

    def __call__(self, task: tuple):
        from aligner.search.trial_job import TrialJob

        self.state.install()
        kind, options = task[0], dict(task[1])
        target = self.target.with_options(options)
        if kind == "sweep":
            from aligner.quant.sweep import full_int8_error

            return full_int8_error(self.graph, target, self.samples, self.reference, task[2])
        if kind == "rank":  # (kind, options, universe, batches, tensor indices): their shares, emulated
            from aligner.quant.quantize import quantize
            from aligner.quant.switch import SwitchableQdq

            key = ("switch", task[1], task[2])
            if key not in self._jobs:
                self._jobs[key] = SwitchableQdq(self.graph, quantize(self.graph, target, exclude=()).model, task[2])
            return self._jobs[key].shares(task[3], None, task[4])
        if kind == "trial":
            job = self._jobs.get(task[1])
            if job is None:
                job = self._jobs[task[1]] = TrialJob(self.graph, target, self.samples, self.reference, self.accept)
            return job(task[2])
        raise ValueError(f"unknown INT8 task {kind!r}")

    @staticmethod
    def trials_on(executor, target: Target) -> "_TrialsOf":
        """``executor`` (started with this job) as one whose tasks are the trials of ``target`` (its
        quantizer options): what the search's trial runner submits to."""
        return _TrialsOf(executor, tuple(sorted(target.option_dict.items())))


class _TrialsOf:
    """An executor started with :class:`QuantizedTrialJob`, seen as one running the trials of one
    target: a task ``t`` goes as ``("trial", options, t)``."""

    def __init__(self, executor, options: tuple):
        self.inner, self.options = executor, options
        self.workers = executor.workers

    def submit(self, task) -> int:
        return self.inner.submit(("trial", self.options, task))

    def result(self, ticket: int):
        return self.inner.result(ticket)

    def discard(self, ticket: int) -> None:
        self.inner.discard(ticket)

    def stats(self):
        return self.inner.stats()


def constant_weights(graph: ModelGraph) -> list[str]:
    """Weights (input 1) of Conv/ConvTranspose/MatMul/Gemm nodes written by Constant nodes, as PaddlePaddle's exporter
    writes every weight (PP-OCRv4 det: all 62 Conv weights). ONNX Runtime's quantizer takes only initializers
    for weights; these it calibrates and quantizes like activations. (Moving them into initializers made
    PP-OCRv4 det's full INT8 worse here — emu:int8 at 320x320, two document pages: output rel_l2 0.27/0.40 -> 0.44/0.59,
    per-channel or not — so aligner says so and leaves the model as it is.)"""
    return [n.input[1] for n in graph.nodes if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] not in graph.initializers and (p := graph.producer.get(n.input[1])) is not None and p.op_type == "Constant"]


class FallbackRanking:
    """What keeping nodes in float can buy, ranked: one group per quantized tensor — the nodes that
    must all stay float for it to stay unquantized (:class:`aligner.quant.switch.SwitchableQdq`) —
    largest own share of the output error first (that tensor alone quantized, Q/DQ in float: one
    emulated run per tensor, on the search's samples and the calibration data — as many as fit in
    about ``seconds``, stacked in batches whose activations fit ``capture_budget_mb``, one sample at least — no
    quantizer call). ``kernel`` nodes (whose integer kernel
    loses accuracy that Q/DQ does not, so emulation cannot rank them) come first, one group each.
    ``executor`` (started with :class:`QuantizedTrialJob`) runs the tensors' runs in chunks on its workers.

    Only the ranking is emulated: where ONNX Runtime's integer kernels and Q/DQ in float disagree
    (they do, by a few 0.01 of output rel_l2 on the PP-OCR models), an emulated verdict on a whole
    plan would be wrong, so every verdict is a trial."""

    def __init__(self, graph: ModelGraph, target: Target, samples: Sequence[Feeds], universe: Sequence[str], kernel: Sequence[str] = (),
                 seconds: float = 120.0, capture_budget_mb: float = 512, executor=None):
        from aligner.quant.calib import ChainedSamples
        from aligner.quant.quantize import calibration_of, quantize
        from aligner.quant.switch import SwitchableQdq

        switch = SwitchableQdq(graph, quantize(graph, target, exclude=()).model, universe)
        # The calibration data ranks too: one sample's error says little (a classifier's output moves on a few images).
        # Read lazily: only the samples the time allows are loaded.
        share, self.samples_read = switch.sensitivity(ChainedSamples(samples, calibration_of(graph, target).samples), seconds,
                                                      capture_budget_mb, executor, tuple(sorted(target.option_dict.items())))
        tensors = switch.tensors
        ranked = sorted((t for t in tensors if switch.adjacent[t]), key=lambda t: (-share[t], tensors.index(t)))
        self.groups = [FallbackGroup(frozenset([n]), n, math.inf, "seed") for n in kernel]
        self.groups += [FallbackGroup(switch.adjacent[t], t, share[t]) for t in ranked]
        self.runs = switch.runs  # emulated runs (a batch of samples counts once)


@dataclass(frozen=True)
class FallbackGroup:
    """Nodes to keep in float together so that ``tensor`` stays unquantized, and that tensor's own
    share of the output error (rel_l2 of the outputs with only it quantized)."""

    nodes: frozenset[str]
    tensor: str
    share: float
    kind: str = "tensor"  # or "seed": a node whose integer kernel loses accuracy

    def reason(self) -> str:
        if self.kind == "seed":
            return "its integer kernel loses accuracy that Q/DQ in float does not (isolated on the target)"
        return f"keeps {self.tensor!r} unquantized (quantized alone it gives output rel_l2 {self.share:.3g}, emulated)"


def search_fallback(groups: Sequence[FallbackGroup], check: Callable, order: Callable[[str], int] = lambda n: 0,
                    ahead: Callable | None = None) -> tuple[list[str], object]:
    """The float fallback, every decision a trial of ``check`` (real kernels):

    1. pure INT8, if it passes;
    2. the shortest passing prefix of the ranked ``groups`` (the nodes of the first k groups kept in
       float; k doubling from 1 until a trial passes, then the gap halved: about 2*log2(N) trials);
    3. that set made 1-minimal (:func:`aligner.search.pins.thin`, least-ranked nodes tried first, in
       blocks while removals pass, one node at a time once they fail): removing any one kept node
       fails the check — the landscape is not monotone (keeping some tensors float makes the output
       *worse*, even with Q/DQ in float), so nothing short of this proves a node necessary.

    ``ahead`` (the evaluator's, with several workers) is told the trials that may come next: the
    doubling's next prefixes, both outcomes of the halving a few levels deep, the removals of step 3.
    Returns (pins, the trial that verifies them) or (every node of the groups, None) when even all
    of them fail."""
    from aligner.search.pins import thin

    look = ahead or (lambda sets: None)

    def prefix(k: int) -> frozenset[str]:
        return frozenset(n for g in groups[:min(k, len(groups))] for n in g.nodes)

    def doubling(k: int) -> Iterator[frozenset[str]]:
        while True:
            yield prefix(k)
            if k >= len(groups):
                return
            k *= 2

    look(_chain([frozenset()], doubling(1)))
    pure = check(frozenset(), "pure")
    if pure.passed:
        return [], pure
    failing, passing, k = 0, None, 1
    while passing is None and failing < len(groups):
        k = min(k, len(groups))
        look(doubling(k))
        if check(prefix(k), "rank").passed:
            passing = k
        else:
            failing, k = k, 2 * k
    if passing is None:
        return sorted(prefix(len(groups)), key=order), None
    while passing - failing > 1:
        look(prefix(m) for m in _bisection(failing, passing))
        mid = (failing + passing) // 2
        if check(prefix(mid), "rank").passed:
            passing = mid
        else:
            failing = mid
    rank = {}
    for i, g in enumerate(groups[:passing]):
        for n in g.nodes:
            rank.setdefault(n, i)
    pins = sorted(rank, key=lambda n: (-rank[n], order(n)))  # least-ranked first: the likeliest to go
    pins = thin(pins, check, ahead)
    return sorted(pins, key=order), check(frozenset(pins), "final")


def _chain(*parts) -> Iterator:
    for part in parts:
        yield from part


def _bisection(failing: int, passing: int) -> Iterator[int]:
    """The midpoints the halving between ``failing`` and ``passing`` checks, breadth first over both
    outcomes of each (the next check's two candidates come right after it)."""
    level = [(failing, passing)]
    while level:
        nxt = []
        for lo, hi in level:
            if hi - lo > 1:
                mid = (lo + hi) // 2
                yield mid
                nxt += [(mid, hi), (lo, mid)]  # it fails, it passes
        level = nxt


def fallback_reasons(pins: Sequence[str], groups: Sequence[FallbackGroup], seeds: dict[str, str]) -> dict[str, str]:
    """Why each kept node is in the plan: the highest-ranked group it belongs to (the tensor it keeps
    unquantized, or a kernel seed), with its isolated error where it has one."""
    out = {}
    for name in pins:
        group = next((g for g in groups if name in g.nodes), None)
        why = group.reason() if group is not None else "kept by the search"
        out[name] = f"{why}; {seeds[name]}" if name in seeds else why
    return out


__all__ = ["FallbackGroup", "FallbackRanking", "QuantizedTrialJob", "constant_weights", "fallback_reasons", "quantizable", "quantization_seeds", "quantizer_settings", "rank_key", "search_fallback"]
