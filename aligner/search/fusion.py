"""Is a passing precision plan safe only because the runtime fuses some nodes?

ONNX Runtime CUDA (and TensorRT) compute a fused normalization kernel inside in FP32 and store only
its output in the low precision, so a decomposed LayerNorm whose variance overflows FP16 when its
nodes run one by one is harmless there. A plan found on such a target can therefore be empty where
a runtime (or version) that does not fuse that pattern needs FP32 pins. The check: the plan's pins
on the plain emulator of the same precision (every node separate, every tensor stored in the low
precision) under the same output acceptance; when that fails, the pin search on the plain emulator
says which nodes a runtime without the fusion needs in FP32, and the fused kernels holding them
are the fusions the plan depends on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from aligner.backends import backend_of, make_runner, reference_runner
from aligner.backends.target import Target
from aligner.errors import TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds

log = logging.getLogger(__name__)


def plan_fusion_dependence(graph: ModelGraph, target: Target, pins: Iterable[str], samples: Sequence[Feeds], accept, search,
                           max_trials: int = 20) -> str:
    """See :func:`_dependence`; ``search`` is the precision search that finds what the plain emulator
    needs (handed in by :func:`aligner.search.precision.search_precision`, which calls this: no
    import circle). A check that cannot run says so in the log and never costs the plan."""
    try:
        return _dependence(graph, target, list(pins), samples, accept, search, max_trials)
    except Exception as exc:  # noqa: BLE001 - a side check: the plan (and --save-model) must survive it
        log.warning("could not check whether the plan relies on a fusion: %s", exc)
        return ""


def _dependence(graph: ModelGraph, target: Target, pins: list[str], samples: Sequence[Feeds], accept, search, max_trials: int) -> str:
    """'' unless the plan ``pins`` passes on ``target`` only thanks to a fusion; then which kernel,
    what goes wrong without it, and what to do (``accept``: the search's Acceptance, bounds and
    finiteness only — an external command is not re-run)."""
    pins = list(pins)
    if target.precision not in ("fp16", "bf16") or not backend_of(target).fuses(target):  # nothing fused: nothing to depend on
        return ""
    from aligner.compare.capture import deployed_graph

    try:
        runner = make_runner(graph, target.with_pins(pins))
        deployed = deployed_graph(runner, graph, samples[0])
    except TargetRunError:
        return ""
    if deployed is None or not deployed.fused:
        return ""
    plain = Target("emu", "cpu", target.precision, tuple(pins))
    why = _fails(graph, plain, samples, accept)
    if not why:
        return ""
    unfused = search(graph, plain, samples, accept, max_trials=max_trials)
    extra = [p for p in unfused.fp32_nodes if p not in pins]
    kernels = [k for k in deployed.fused if set(extra) & set(k.originals)]
    shown = "; ".join(f"{k.op_type} {k.name!r} ({len(k.originals)} nodes from {k.originals[0]!r})" for k in kernels[:4])
    where = (f"{len(kernels)} fused kernel(s): {shown}{'; ...' if len(kernels) > 4 else ''}" if kernels
             else f"the {len(deployed.fused)} fused kernel(s) of {deployed.runtime}")
    if unfused.passed:
        needs = (f"the same acceptance needs {len(extra)} more FP32 pin(s) there ({', '.join(extra[:6])}{', ...' if len(extra) > 6 else ''}"
                 f"{', inside the fused kernels' if kernels and all(any(p in k.originals for k in kernels) for p in extra) else ''})")
    else:
        needs = f"no plan passed there within {max_trials} trials"
    return (f"safe only because of a fusion: this plan passes on {target.with_pins([])} thanks to {where}; on {plain.base}, which does "
            f"not fuse, it fails ({why}) and {needs}. A runtime or version that does not fuse {'it' if len(kernels) == 1 else 'them'} "
            f"needs those pins: aligner precision --target {plain.base}")


def _fails(graph: ModelGraph, target: Target, samples: Sequence[Feeds], accept) -> str:
    ref, runner = reference_runner(graph), make_runner(graph, target)
    from aligner.search.acceptance import check_outputs

    return next((why for why in (check_outputs(accept, ref.run(feeds), runner.run(feeds)) for feeds in samples) if why), "")


__all__ = ["plan_fusion_dependence"]
