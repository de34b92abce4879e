"""The accuracy check of an INT8 build (``aligner build --target ort:cpu:int8+plan.json``).

The build's outputs against FP32 under the acceptance of the plan it was made from (its
METRIC<=VALUE bounds; when the plan was accepted by a command or a task metric, which a build cannot
re-run, the check is finite outputs and a note says to re-run that) or, without a plan, INT8's
default tolerance. On ``ort:cpu`` it runs on the integer kernels themselves; elsewhere (a GPU is not
needed to build) with Q/DQ evaluated in float, ``emu:int8``, with the target's quantizer settings.
"""

from __future__ import annotations

from aligner.backends.target import Target, plan_doc
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds


def check_int8(graph: ModelGraph, target: Target, feeds: Feeds) -> tuple[str, tuple[str, ...], float, tuple[str, ...], str]:
    """(the target checked on, the acceptance, worst output rel_l2, diverging outputs, a note or '')."""
    from aligner.backends import make_runner, reference_runner
    from aligner.search.acceptance import Acceptance, default_acceptance

    note = ""
    accept = default_acceptance("int8")
    if target.plan:
        planned = [str(a) for a in plan_doc(target.plan).get("accept") or []]
        accept = Acceptance.parse([s for s in planned if _is_bound(s)])
        if not accept.bounds:
            note = (f"the plan was accepted by {'; '.join(p for p in planned if p != 'outputs finite') or 'its own check'}: "
                    "re-run that on the build (the build's own check: outputs finite)")
    on = target if (target.runtime, target.device) == ("ort", "cpu") else emulated(target)
    reference = reference_runner(graph).run(feeds)
    got = make_runner(graph, on).run(feeds)
    worst: dict[str, float] = {}
    diverging = tuple(n for n in graph.output_names if accept.check_outputs({n: reference[n]}, {n: got[n]}, worst))
    return on.base, accept.describe(), float(worst.get("rel_l2", 0.0)), diverging, note


def emulated(target: Target) -> Target:
    """``emu:int8`` quantizing as ``target`` does: its calibration and settings written out (a
    trt:int8 default such as s8s8 symmetric is not emu's), no runtime or builder options."""
    from aligner.quant.quantize import QUANT_OPTIONS, QuantSettings

    options = {k: v for k, v in target.options if k in QUANT_OPTIONS} | QuantSettings.of(target).options()
    return Target("emu", "cpu", "int8", target.pins, target.plan, tuple(sorted(options.items())))


def _is_bound(spec: str) -> bool:
    from aligner.search.acceptance import Acceptance

    try:
        return bool(Acceptance.parse([spec]).bounds)
    except InputError:
        return False


__all__ = ["check_int8", "emulated"]
