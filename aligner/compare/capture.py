"""How a target is observed without changing it: the capture policy, the deployed graph's kernels
and the check that a capture run computed what an uncaptured run computes.

On a runtime that fuses, making an intermediate tensor a graph output can stop a fusion and change
the numbers (a decomposed LayerNorm that the fused kernel computes in FP32 overflows FP16 once
unfused). So on fusing targets only tensors that exist in the deployed graph are captured by
default (``boundaries``), and every capture run's graph outputs are checked against an uncaptured
run. A capture is a *perturbation* only where it could change the answer: it moved the outputs by
more than a tenth of the tolerance (and beyond run-to-run noise); then a tensor of that run is
labelled, not blamed, unless its divergence dwarfs what the capture did to the outputs. A lost FP32
Conv+BatchNorm fold (outputs move ~1e-6) never silences an edited Conv (rel_l2 0.05); capturing
inside a fused FP16 LayerNorm (outputs turn NaN) still labels what it shows.
"""

from __future__ import annotations

import logging

from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
import numpy as np

from aligner.backends.base import POLICIES, CapturePolicy, capture_policy
from aligner.errors import InputError
from aligner.graph.deployed import DeployedGraph, fp32_fallback, kernels_of_onnx, kernels_of_trt, map_deployed
from aligner.graph.model import ModelGraph

log = logging.getLogger(__name__)

def deployed_graph(runner, graph: ModelGraph, feeds: Mapping[str, np.ndarray] | None = None) -> DeployedGraph | None:
    """The deployed graph of ``runner`` mapped onto ``graph`` (None where the runner cannot say):
    ONNX Runtime's optimized model, TensorRT's layer information (its engine needs ``feeds``), or the
    runtime's own map (OpenVINO's runtime model: ``runner.deployed_graph``)."""
    own = getattr(runner, "deployed_graph", None)
    if own is not None:
        return own(graph, feeds)
    layers = getattr(runner, "layer_information", None)
    if layers is not None and feeds is not None:
        info = layers(dict(feeds))
        try:
            return map_deployed(graph, kernels_of_trt(info), str(runner.target)) if info is not None else None
        except InputError as exc:  # e.g. names only: no map, so only the graph outputs are captured
            log.warning("%s: no deployed-graph map from TensorRT's layer information (%s); capturing the graph outputs", runner.target, exc)
            return None
    optimized = getattr(runner, "optimized_model", None)
    if optimized is None:
        return None
    from dataclasses import replace

    model = optimized()
    return replace(map_deployed(graph, kernels_of_onnx(model), str(runner.target)), fp32_fallback=fp32_fallback(model))


# A capture changes the answer only if it moves the target's outputs by a meaningful part of the
# tolerance: more than this fraction of it (the rule segments are held to as well).
MEANINGFUL = 0.1
# A tensor whose relative divergence is this many times the capture's relative effect on the outputs
# is blamed even in a capture run that moved them: the capture cannot explain it.
DWARFS = 10.0


@dataclass(frozen=True)
class Perturbation:
    """How a capture run moved the target's graph outputs against an uncaptured run. ``why`` is ''
    when it could not change any verdict (a move within run-to-run noise or within a tenth of the
    tolerance: a lost FP32 Conv+BatchNorm fold moves outputs by ~1e-6, the FP32 tolerance is 1e-4);
    ``effect`` is its size, rel_l2 of the worst output (inf when the NaN/inf pattern, a shape or an
    integer output changed)."""

    why: str = ""
    effect: float = 0.0
    beyond_tolerance: bool = False  # the outputs moved beyond the tolerance itself, not only a tenth of it

    def __bool__(self) -> bool:
        return bool(self.why)

    def explains(self, metrics: Mapping[str, float], reason: str) -> bool:
        """Whether this capture's effect can account for a tensor diverging with ``metrics`` for
        ``reason``: NaN/inf only when the capture moved the outputs beyond the tolerance; a metric
        divergence unless its rel_l2 dwarfs the effect (DWARFS times it)."""
        if not self.why:
            return False
        if reason == "nonfinite" or not np.isfinite(self.effect):
            return self.beyond_tolerance or not np.isfinite(self.effect)
        if reason != "metric":
            return True  # shape or integer values changed by a capture that moved the outputs: not vouched for
        rel = metrics.get("rel_l2", float("inf"))
        return not (np.isfinite(rel) and rel > DWARFS * self.effect)


def fraction(tol, part: float):
    """``tol`` tightened to ``part`` of itself (cosine and snr_db are tightened on their own scales)."""
    from dataclasses import replace

    threshold = {"cosine": 1 - (1 - tol.threshold) * part, "snr_db": tol.threshold - 20 * np.log10(part)}.get(tol.metric, tol.threshold * part)
    return replace(tol, threshold=threshold, atol=tol.atol * part)


class CaptureCheck:
    """The uncaptured run's outputs and the run-to-run noise between two of them. The second run is
    made only when a capture run's outputs moved by a meaningful part of the tolerance — the noise
    can only widen the bound — so a capture that changed nothing costs one uncaptured run, not two."""

    def __init__(self, baseline: Mapping[str, np.ndarray] | Future, second: Callable[[], Mapping[str, np.ndarray]]):
        self._baseline = baseline
        self._second, self._noise = second, None  # the second uncaptured run, made on first use of ``noise``

    @property
    def baseline(self) -> Mapping[str, np.ndarray]:
        """The uncaptured run's outputs (waited for when it runs in the background; its error raised here)."""
        if isinstance(self._baseline, Future):
            self._baseline = self._baseline.result()
        return self._baseline

    @property
    def noise(self) -> float:
        """Largest |a - b| between two uncaptured runs (the second run made on first use)."""
        if self._noise is None:
            self._noise = _largest_difference(self.baseline, self._second())
        return self._noise

    @property
    def outputs(self) -> list[str]:
        return list(self.baseline)

    def moved(self, values: Mapping[str, np.ndarray], tolerance) -> Perturbation:
        """How the captured run's outputs ``values`` moved from the uncaptured run's, judged by
        ``tolerance`` (the comparison's :class:`~aligner.compare.tolerance.Tolerance`)."""
        from aligner.compare.metrics import measure

        worst, why, beyond = 0.0, "", False
        for name, base in self.baseline.items():
            rule = tolerance.for_output(name)  # a per-output rule judges that output's move too
            meaningful = fraction(rule, MEANINGFUL)
            got = values.get(name)
            if got is None:
                continue
            base, got = np.asarray(base), np.asarray(got)
            if base.shape != got.shape or not np.array_equal(np.isfinite(base), np.isfinite(got)):
                return Perturbation(f"output {name!r} changed its NaN/inf pattern" if base.shape == got.shape
                                    else f"output {name!r} changed its shape", float("inf"), True)
            if base.dtype.kind not in "fc":
                if not np.array_equal(base, got):
                    return Perturbation(f"output {name!r} changed", float("inf"), True)
                continue
            metrics = measure(base, got)[0]
            if not meaningful.exceeded(metrics) or metrics["max_abs"] <= 4 * self.noise:
                continue
            worst = max(worst, metrics["rel_l2"])
            beyond = beyond or rule.exceeded(metrics)
            why = why or (f"output {name!r} moved by rel_l2 {metrics['rel_l2']:.3g}, max_abs {metrics['max_abs']:.3g} (more than "
                          f"{MEANINGFUL:g} of the tolerance; run-to-run noise {self.noise:.3g})")
        return Perturbation(why, worst, beyond)


def _largest_difference(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> float:
    noise = 0.0
    for name, a in first.items():
        a, b = np.asarray(a), np.asarray(second[name])
        if a.dtype.kind in "fc" and a.shape == b.shape:
            both = np.isfinite(a) & np.isfinite(b)
            noise = max(noise, float(np.max(np.abs(a[both].astype(np.float64) - b[both]), initial=0.0)))
    return noise


def capture_check(runner, feeds: Mapping[str, np.ndarray], background: bool = False) -> CaptureCheck | None:
    """An uncaptured run of a fusing runner (its outputs as deployed), and a second one for the
    run-to-run noise when a capture run's outputs moved. ``background``: the first run starts in a
    thread (a sandboxed runner computes it in its child meanwhile) and is waited for on first use."""
    if not getattr(runner, "fuses", False):
        return None
    if background:
        pool = ThreadPoolExecutor(1, thread_name_prefix="aligner-uncaptured")
        first = pool.submit(runner.run, dict(feeds))
        pool.shutdown(wait=False)
    else:
        first = runner.run(dict(feeds))
    return CaptureCheck(first, lambda: runner.run(dict(feeds)))


@dataclass
class Observer:
    """How one target is observed: its capture policy, its deployed graph where it fuses, and the
    check of every capture run against an uncaptured one."""

    policy: str
    deployed: DeployedGraph | None
    check: CaptureCheck | None
    said: tuple[str, ...] = ()  # what the runner says of itself (OpenVINO: a precision hint it did not honour)
    # the reference's graph outputs, asked for only when a capture run moved the target's (see label)
    reference: Callable[[], Mapping[str, np.ndarray]] | None = None

    @classmethod
    def of(cls, runner, graph: ModelGraph, feeds: Mapping[str, np.ndarray], background: bool = False) -> "Observer":
        policy = getattr(runner, "capture_policy", "all")
        deployed = deployed_graph(runner, graph, feeds) if policy == "boundaries" else None
        said = tuple(n for n in [getattr(runner, "hint_note", "")] if n)
        return cls(policy, deployed, capture_check(runner, feeds, background), said)

    @property
    def fused(self) -> list:
        return self.deployed.fused if self.deployed is not None else []

    @cached_property
    def absorbed(self) -> frozenset[str]:
        """Tensors that exist only inside fused kernels (computed once: callers test membership per tensor)."""
        if self.deployed is None:
            return frozenset()
        outputs, kept = self.deployed.node_outputs, self.deployed.boundaries
        return frozenset(o for k in self.deployed.fused for n in k.originals for o in outputs.get(n, ()) if o not in kept)

    def notes(self, unmatched: list[str]) -> list[str]:
        out = list(self.said)
        if self.deployed is None:
            return out
        ran = Counter(k.precision for k in self.deployed.kernels if k.precision and k.originals)
        if ran:
            out.append(f"the deployed graph ({self.deployed.runtime}) ran its layers computing ONNX nodes in: "
                       + ", ".join(f"{p} {n}" for p, n in ran.most_common()) + " (each kernel's precision is in the JSON)")
        if self.deployed.fp32_fallback:
            out.append(f"the deployed graph ({self.deployed.runtime}) computes {self.deployed.fp32_fallback} node(s) in FP32: ONNX Runtime "
                       "has no kernel of that precision for them here and casts around them (those tensors exist only under "
                       "its own names, so they are not captured). Use emu:fp16/emu:bf16 for what a GPU low-precision build stores")
        inside = [t for t in unmatched if t in self.absorbed]
        fused = self.fused
        if not fused:
            return out
        by_op = Counter(k.op_type.split("::")[-1] for k in fused)
        biggest = max(fused, key=lambda k: len(k.originals))
        shown = ", ".join(f"{n} {op}" for op, n in by_op.most_common(6)) + (", ..." if len(by_op) > 6 else "")
        return out + [f"capture=boundaries: the deployed graph ({self.deployed.runtime}) has {len(fused)} fused kernel(s) ({shown}; the "
                f"largest, {biggest.op_type} {biggest.name!r}, computes {len(biggest.originals)} nodes); the {len(inside)} tensor(s) inside them exist only in the original graph and "
                "were not captured, since capturing them would change what is deployed (capture=all captures them, with the "
                "perturbation check)"]

    def capture(self, runner, feeds: Mapping[str, np.ndarray], names: list[str], tolerance) -> tuple[dict, Perturbation]:
        """``names`` captured on the target, and how the capture moved its outputs as judged by ``tolerance``."""
        if self.check is None:
            return runner.run(dict(feeds), names), Perturbation()
        extra = [o for o in self.check.outputs if o not in names]
        values = runner.run(dict(feeds), list(names) + extra)
        moved = self.check.moved(values, tolerance)
        for o in extra:
            values.pop(o, None)
        for o in names:  # the graph outputs as deployed: the uncaptured run's, whatever this capture did to them
            if o in self.check.baseline:
                values[o] = self.check.baseline[o]
        return values, moved

    def label(self, row, moved: Perturbation):
        """``row`` with its kernel and, when its capture run moved the outputs enough to explain its
        verdict, that fact (then it is labelled, not blamed); a divergence that dwarfs the capture's
        effect stays blamed, with that effect recorded. Graph outputs are never labelled: their values
        are the uncaptured run's, what the target deploys."""
        from dataclasses import replace

        kernel = self.deployed.kernel_of.get(row.node, "") if self.deployed is not None else ""
        if self.check is not None and row.tensor in self.check.baseline:
            moved = Perturbation()  # a graph output is judged on the uncaptured run (see capture): always vouched for
        if moved and not (row.diverges and not moved.explains(row.metrics, row.reason)) and not self._outputs_dwarf(row, moved):
            return replace(row, kernel=kernel, perturbed=moved.why, capture_effect=moved.effect)
        if moved:
            return replace(row, kernel=kernel, capture_effect=moved.effect)
        return replace(row, kernel=kernel) if kernel else row


    def _outputs_dwarf(self, row, moved: Perturbation) -> bool:
        """Whether the target's deployed (uncaptured) outputs diverge from the reference's DWARFS times
        more than this capture moved them, so the capture cannot account for a metric divergence seen
        in its run: what the target deploys diverges by far more with no capture at all (e.g. OpenVINO
        writes a captured bf16 layer output as an f32 Result, which moves the outputs a little, while
        the uncaptured outputs are off by much more)."""
        if not row.diverges or row.reason != "metric" or self.reference is None or self.check is None or not np.isfinite(moved.effect):
            return False
        return self.output_divergence > DWARFS * moved.effect

    @cached_property
    def output_divergence(self) -> float:
        """The largest rel_l2 between the target's uncaptured outputs and the reference's (float outputs)."""
        from aligner.compare.metrics import rel_l2

        reference, worst = self.reference(), 0.0
        for name, value in self.check.baseline.items():
            ref = reference.get(name)
            if ref is None or not isinstance(value, np.ndarray) or value.dtype.kind != "f" or np.shape(ref) != np.shape(value):
                continue
            worst = max(worst, float(rel_l2(ref, value)))
        return worst


def fusion_dependence(graph: ModelGraph, target, feeds: Mapping[str, np.ndarray], observer: Observer, tolerance) -> str:
    """'' unless ``target`` passes only because of a fusion: then which kernel, and what happens
    without it (the plain emulator of the same precision stores every tensor of the kernel)."""
    if not observer.fused or target.precision not in ("fp16", "bf16"):
        return ""
    from aligner.backends.target import Target
    from aligner.compare.layerwise import compare

    plain = Target("emu", "cpu", target.precision, tuple(target.pins))
    # only what the fused kernels hold: outside them the deployed graph stores what the plain emulator stores
    held = list(dict.fromkeys(o for k in observer.fused for n in k.originals if n in graph.node_by_name
                              for o in graph.node(n).output if o))
    unfused = compare(graph, target=plain, feeds=dict(feeds), tolerance=tolerance, tensors=held)
    first = unfused.first_nonfinite or unfused.first_divergent
    if first is None:
        return ""
    kernel = next((k for k in observer.fused if first.node in k.originals), None)
    where = (f"the fused kernel {kernel.op_type} {kernel.name!r} ({len(kernel.originals)} nodes)" if kernel is not None
             else "the fusions of the deployed graph")
    how = "NaN/inf" if first.new_nonfinite else f"{tolerance.metric} {first.metrics.get(tolerance.metric, float('nan')):.3g}"
    return (f"safe only because of a fusion: without {where}, {plain} diverges at {first.node!r} ({first.op_type}: {how}); a runtime "
            "or version that does not fuse it needs those nodes in FP32 (aligner precision --target " + str(plain) + ")")


__all__ = ["Observer", "Perturbation", "fusion_dependence", "fraction", "CaptureCheck", "CapturePolicy", "POLICIES", "capture_check", "capture_policy", "deployed_graph"]
