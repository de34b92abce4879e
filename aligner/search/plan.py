"""The precision plan: what to keep in FP32 and why, as JSON, TensorRT strings and a trials log."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


from aligner.compare.results import json_float
from aligner.errors import InputError
from aligner.graph.model import ModelGraph, concrete_shapes
from aligner.search.pins import Trial

TRT_CAVEAT = ("TensorRT <= 10 only: per-layer precision flags need --precisionConstraints=obey (trtexec) or "
              "--precision-constraints obey (Polygraphy), and may still not be obeyed inside fused blocks; TensorRT 11 "
              "removed them. Prefer the rewritten mixed model (explicit Casts), which every TensorRT version and "
              "ONNX Runtime honour.")


@dataclass(frozen=True)
class Pin:
    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class PrecisionPlan:
    model: str
    precision: str
    target: str
    accept: tuple[str, ...]
    pins: tuple[Pin, ...]
    passed: bool
    trials: int  # acceptance checks run (cached repeats not counted)
    culprit_runs: int  # extra target runs spent locating culprits while growing
    final_metrics: dict[str, float]
    fp16_flop_fraction: float
    auto_pinned: dict[str, str] = field(default_factory=dict)
    seeds: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def fp32_nodes(self) -> list[str]:
        return [p.node for p in self.pins]

    def op_type_summary(self) -> dict[str, int]:
        return dict(Counter(p.op_type for p in self.pins).most_common())

    def tensorrt_legacy(self) -> dict:
        names = self.fp32_nodes
        return {
            "trtexec": f"--layerPrecisions={','.join(f'{n}:fp32' for n in names)} --precisionConstraints=obey" if names else "",
            "polygraphy": f"--layer-precisions {' '.join(f'{n}:float32' for n in names)} --precision-constraints obey" if names else "",
            "caveat": TRT_CAVEAT,
        }

    def to_dict(self) -> dict:
        return {
            "model": self.model, "precision": self.precision, "target": self.target, "accept": list(self.accept),
            "fp32_nodes": [p.to_dict() for p in self.pins], "passed": self.passed, "trials": self.trials,
            "culprit_runs": self.culprit_runs,
            "final": {"metrics": {k: json_float(v) for k, v in self.final_metrics.items()}},
            "fp16_flop_fraction": self.fp16_flop_fraction, "op_types": self.op_type_summary(),
            "auto_pinned": self.auto_pinned, "seeds": list(self.seeds), "tensorrt_legacy": self.tensorrt_legacy(),
            "notes": list(self.notes),
        }


def flop_fraction(graph: ModelGraph, fp32_nodes: Iterable[str], input_shapes: dict[str, tuple[int, ...]]) -> float:
    """Share of Conv/MatMul/Gemm FLOPs that stay in low precision (1.0 when there are none)."""
    infos = concrete_shapes(graph, input_shapes)
    pinned = set(fp32_nodes)
    total = low = 0.0
    for node in graph.nodes:
        flops = _flops(node, infos)
        total += flops
        if node.name not in pinned:
            low += flops
    return 1.0 if total == 0 else low / total


def _flops(node, infos) -> float:
    if node.op_type not in ("Conv", "MatMul", "Gemm"):
        return 0.0
    shape = lambda name: infos[name].shape if name in infos and infos[name].shape and all(isinstance(d, int) for d in infos[name].shape) else None  # noqa: E731
    out, a, w = shape(node.output[0]), shape(node.input[0]), shape(node.input[1])
    if out is None or w is None:
        return 0.0
    if node.op_type == "Conv":  # 2 * outputs * (Cin/group * kernel)
        return 2.0 * math.prod(out) * math.prod(w[1:])
    k = a[-1] if a else w[0]
    if node.op_type == "Gemm":
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a[0] if (a and trans_a) else k
    return 2.0 * math.prod(out) * k


PLAN_SUFFIX = "+plan"


def plan_target(spec: str, plan: Iterable[str]):
    """``"ort:cuda:fp16+plan"`` -> (the target, the plan's FP32 nodes); without the suffix, no pins."""
    from aligner.backends.target import parse_target

    base, with_plan = (spec[: -len(PLAN_SUFFIX)], True) if spec.endswith(PLAN_SUFFIX) else (spec, False)
    plan = list(plan)
    if with_plan and not plan:
        raise InputError(f"Target {spec!r} asks for the plan, but no plan was given (--plan plan.json).")
    return parse_target(base), plan if with_plan else []


def read_plan(path: str | Path | None) -> list[str]:
    """The FP32 nodes of a plan file written by ``aligner precision --out`` ([] for no path)."""
    if not path:
        return []
    try:
        return [p["node"] for p in json.loads(Path(path).read_text())["fp32_nodes"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"--plan {path}: not a plan written by aligner precision ({exc}).") from None


# ---- the trials log ----------------------------------------------------------------------------

class TrialLog:
    """Append-only JSONL: a header naming the search, then one line per trial. Reading it back
    gives a cache from pin set to result, which is how ``--resume`` continues a search."""

    def __init__(self, path: Path | None, header: dict, resume: Path | None = None):
        self.path, self.header = path, header
        self.cache: dict[frozenset[str], Trial] = {}
        if resume is not None:
            self._read(resume)
        if path is not None and not (resume is not None and path.resolve() == resume.resolve()):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": header}) + "\n")
            for trial in self.cache.values():  # carry resumed trials over to the new log
                self._append(trial)

    def _read(self, path: Path) -> None:
        if not path.exists():
            raise InputError(f"--resume {path}: no such trials log.")
        lines = path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["header"]
            rows = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, KeyError, json.JSONDecodeError) as exc:
            raise InputError(f"--resume {path}: not a trials log written by aligner precision ({exc}).") from None
        for key in ("model_sha", "target", "accept", "samples"):
            if header.get(key) != self.header.get(key):
                raise InputError(f"--resume {path}: it was written for a different search ({key}: {header.get(key)!r} "
                                 f"vs now {self.header.get(key)!r}); start a new log instead.")
        for row in rows:
            trial = Trial(frozenset(row["pins"]), row["passed"], row.get("phase", ""), row.get("metrics", {}),
                          row.get("culprit"), row.get("error", ""), row.get("seconds", 0.0), row.get("reason", ""))
            self.cache[trial.pins] = trial

    def record(self, trial: Trial) -> None:
        self.cache[trial.pins] = trial
        self._append(trial)

    def _append(self, trial: Trial) -> None:
        if self.path is None:
            return
        row = {"pins": sorted(trial.pins), "passed": trial.passed, "phase": trial.phase, "culprit": trial.culprit,
               "error": trial.error, "seconds": round(trial.seconds, 3), "reason": trial.reason,
               "metrics": {k: json_float(v) for k, v in trial.metrics.items()}}
        with open(self.path, "a") as f:  # one line per trial, flushed: an interrupted search loses nothing
            f.write(json.dumps(row) + "\n")


__all__ = ["Pin", "PrecisionPlan", "TRT_CAVEAT", "TrialLog", "PLAN_SUFFIX", "flop_fraction", "plan_target", "read_plan"]
