"""Plans replay what was verified, or refuse.

A plan written by ``aligner precision`` records what its acceptance was verified with (its
``verified`` block: the model's content hash, node count, inputs and the number of samples; INT8
plans also their quantizer settings and calibration data, path and content hash). ``TARGET+plan.json``
then runs exactly that — the plan's settings and calibration, on the model it was searched on — or
refuses with :class:`aligner.errors.PlanError` (exit 2) saying what differs and what to do:

* another model (a plan searched on PP-OCR's detector applied to its recognizer: generic node
  names like ``p2o.Conv.0`` match, the model does not);
* INT8: calibration data missing or changed, or other calibration given (``--calib``);
* INT8: quantizer settings given that contradict the plan's (checked where the target is parsed).

A plan without the block (an older aligner, or written by hand) still loads, with a warning that it
cannot be checked; so does the warning that a plan's acceptance rests on few samples.
Models built by ``aligner build`` run as built: their plan was applied (and checked) at build time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from aligner.backends.target import Target, plan_doc
from aligner.errors import PlanError
from aligner.graph.model import ModelGraph

log = logging.getLogger(__name__)

FEW_SAMPLES = 8  # a plan verified on fewer samples gets a warning: one classifier plan searched on 4 images agreed with FP32 on 90.6 % of 32 fresh ones
_warned: set[tuple[str, str]] = set()
_digests: dict[int, tuple[ModelGraph, str]] = {}


# ---- what a search records ---------------------------------------------------------------------

def verification(graph: ModelGraph, samples: Sequence[dict]) -> dict:
    """The ``verified`` block of a plan searched on ``graph`` with ``samples``."""
    from aligner.graph.fingerprint import DIGEST_DESCRIPTION

    first = samples[0] if samples else {}
    return {"model": str(graph.path or "<in-memory>"), "model_sha": model_sha(graph), "hash": DIGEST_DESCRIPTION,
            "nodes": len(graph.model.graph.node), "inputs": {k: list(v.shape) for k, v in first.items()}, "samples": len(samples)}


def calibration_record(target: Target) -> dict:
    """Where an INT8 target's calibration data lies (absolute path, or None: generated inputs) and the
    content hash of its files, for the plan's ``quantization.calibration``."""
    source = target.option_dict.get("calib")
    if not source:
        return {"path": None}
    from aligner.quant.calib_digest import calibration_digest

    sha, files = calibration_digest(source)
    return {"path": str(Path(source).resolve()), "files_sha": sha, "files": files}


def model_sha(graph: ModelGraph) -> str:
    """:func:`aligner.graph.fingerprint.model_digest` of ``graph``, computed once per graph object."""
    from aligner.graph.fingerprint import model_digest

    hit = _digests.get(id(graph))
    if hit is None or hit[0] is not graph:
        if len(_digests) >= 4:
            _digests.clear()
        hit = _digests[id(graph)] = (graph, model_digest(graph.model))
    return hit[1]


# ---- what a replay checks ----------------------------------------------------------------------

def planned_calibration(path: str | Path) -> dict | None:
    """An INT8 plan's recorded calibration (``path``: absolute, or None for generated inputs), or None
    when the plan records none (an older plan)."""
    record = (plan_doc(path).get("quantization") or {}).get("calibration")
    return record if isinstance(record, dict) and "path" in record else None


def check_replay(graph: ModelGraph, target: Target) -> None:
    """Refuse ``target``'s plan on ``graph`` unless it is the model (and, INT8, the calibration) the plan
    was verified with; warn when the plan cannot be checked or rests on few samples."""
    if target.plan is None:
        return
    from aligner.graph.precision import built_precision

    if built_precision(graph.model) or any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.model.graph.node):
        return  # built (the plan was applied at build time) or quantized elsewhere (the INT8 runner refuses its pins)
    verified = plan_doc(target.plan).get("verified")
    if not isinstance(verified, dict) or not verified.get("model_sha"):
        _warn_once(target.plan, "old", f"Plan {target.plan} records no model hash (written by an older aligner or by hand): it cannot be "
                   "checked against this model or its calibration. Re-run aligner precision to get a plan that can.")
    else:
        _check_model(graph, target, verified)
        _warn_few_samples(target.plan, verified)
    check_calibration(target)


def _check_model(graph: ModelGraph, target: Target, verified: dict) -> None:
    sha = model_sha(graph)
    if sha == verified["model_sha"]:
        return
    here = _describe(sha, len(graph.model.graph.node), {i.name: list(i.shape or ()) for i in graph.input_infos()})
    there = _describe(verified["model_sha"], verified.get("nodes"), verified.get("inputs") or {})
    missing = [p for p in target.pins if p not in graph.node_by_name]
    names = (f"{len(target.pins) - len(missing)} of its {len(target.pins)} node name(s) exist here, which proves nothing" if target.pins
             else "it keeps no node, but it was verified for that model")
    model = graph.path or "this model"
    raise PlanError(f"Plan {target.plan} was verified on another model: {verified.get('model', '?')} ({there}); {model} is {here}. "
                    f"The plan does not apply to it ({names}). Search a plan for this model: aligner precision {model} "
                    f"--target {target.base} --out plan.json")


def _describe(sha: str, nodes, inputs: dict) -> str:
    shown = ", ".join(f"{k}[{'x'.join(str(d) for d in v)}]" for k, v in inputs.items())
    return f"content sha {sha}, {nodes} nodes" + (f", inputs {shown}" if shown else "")


def check_calibration(target: Target) -> None:
    """An INT8 ``+plan.json`` target calibrates on the data its plan was verified with, or is refused:
    that data missing or changed, or other data given. A plan without a calibration record is not checked."""
    if target.plan is None or not target.is_quantized:
        return
    record = planned_calibration(target.plan)
    if record is None:
        return
    source, planned = target.option_dict.get("calib"), record.get("path")
    search = f"aligner precision MODEL --target {target.base} --calib YOUR_DATA --out plan.json"
    if planned is None:
        if source:
            raise PlanError(f"Plan {target.plan} was verified calibrating on generated inputs (it was searched without --calib); "
                            f"calibrating on {source} would quantize another model. Drop --calib (and calib=), or search a plan with "
                            f"that data: {search.replace('YOUR_DATA', str(source))}")
        return
    recorded = f"{planned} (content sha {record.get('files_sha')}, {record.get('files')} file(s))"
    if not source:
        raise PlanError(f"Plan {target.plan} was verified calibrating on {recorded}, and this target has no calibration data; give "
                        f"the same data with --calib, or search a plan with the data you have: {search}")
    if not Path(source).exists():
        raise PlanError(f"Plan {target.plan} was verified calibrating on {recorded}, which no longer exists"
                        f"{'' if Path(source).resolve() == Path(planned) else f' (nor does {source})'}. Give the same data with "
                        f"--calib PATH, or search a plan with the data you have: {search}")
    from aligner.quant.calib_digest import calibration_digest

    sha, files = calibration_digest(source)
    if sha != record.get("files_sha"):
        moved = Path(source).resolve() != Path(planned)
        where, fix = (("the calibration given, {source}, is other data", "Drop --calib (and calib=) to calibrate on the plan's data")
                      if moved else ("it now holds other data", "Restore that data (or give it with --calib)"))
        raise PlanError(f"Plan {target.plan} was verified calibrating on {recorded}; {where.format(source=source)} (content sha {sha}, "
                        f"{files} file(s)), so the QDQ model would not be the one verified. {fix}, or search a plan with the new "
                        f"data: {search.replace('YOUR_DATA', str(source))}")


_TENSOR_BOUND = re.compile(r"^(?:[^:]+: )?(?:finite \(no metric bound\)|\w+ (?:<=|>=) \S+(?: \(or max_abs <= \S+\))?)$")


def judged_on_own_data(accept) -> bool:
    """Whether a plan's acceptance has a check with data of its own (a task metric such as COCO AP
    over its images, a command, a callable): then the samples it was searched on are not all it was
    judged on, and "few samples" does not apply."""
    return any(not _TENSOR_BOUND.match(str(clause)) for clause in accept or ())


def _warn_few_samples(plan: str, verified: dict) -> None:
    samples = verified.get("samples")
    if isinstance(samples, int) and samples < FEW_SAMPLES and not judged_on_own_data(verified.get("accept")):
        _warn_once(plan, "samples", f"plan {plan} was verified on {samples} sample(s); its acceptance may not hold on other inputs "
                   f"(a plan searched on 4 classifier images agreed with FP32 on 90.6 % of 32 fresh ones). Search on "
                   f"{FEW_SAMPLES} or more representative samples: aligner precision MODEL --inputs-dir DIR ...")


def _warn_once(plan: str, kind: str, message: str) -> None:
    key = (str(Path(plan).resolve()), kind)
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


__all__ = ["FEW_SAMPLES", "calibration_record", "check_calibration", "check_replay", "judged_on_own_data", "model_sha", "planned_calibration", "verification"]
