"""The precision plan: what to keep in FP32 and why, as JSON, TensorRT strings and a trials log."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


from aligner.compare.results import json_float
from aligner.errors import InputError
from aligner.graph.model import ModelGraph, concrete_shapes
from aligner.inputs import check_output_path
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
    quantization: dict = field(default_factory=dict)  # INT8: quantizer, settings, calibration, sweep
    fusion_dependence: str = ""  # the plan passes only because the runtime fuses some nodes: which, and what without
    inside: str = ""  # with the plan, tensors inside that still diverge though the outputs pass (masked): how many, where
    # What the acceptance was verified with (aligner.backends.replay.verification: the model's content hash, its node count
    # and inputs, the number of samples): TARGET+plan.json refuses another model. INT8 searches record it with their
    # quantizer settings (aligner.search.int8.quantizer_settings), from where it moves here.
    verified: dict = field(default_factory=dict)

    def __post_init__(self):
        if "verified" in self.quantization:  # one place in the plan: its own block (an explicit verified= wins)
            quantization = dict(self.quantization)
            recorded = quantization.pop("verified")
            object.__setattr__(self, "quantization", quantization)
            if not self.verified and isinstance(recorded, dict):
                object.__setattr__(self, "verified", recorded)

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
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"fusion_dependence": self.fusion_dependence} if self.fusion_dependence else {}),
            **({"inside": self.inside} if self.inside else {}),
            **({"verified": self.verified} if self.verified else {}),
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


# ---- the trials log ----------------------------------------------------------------------------

log = logging.getLogger(__name__)


class TrialLog:
    """Append-only JSONL: a header naming the search, then one line per trial. Reading it back
    gives a cache from pin set to result, which is how ``--resume`` continues a search.

    It survives a hard kill: a torn last line is dropped with a warning (and cut off before
    appending). While a search writes it, ``LOG.lock`` beside it is held, so a second search
    cannot interleave its trials into the same log. Use as a context manager (or call ``close``)."""

    def __init__(self, path: Path | None, header: dict, resume: Path | None = None):
        self.path, self.header = path, header
        self.cache: dict[frozenset[str], Trial] = {}
        self.resumed = 0  # trial lines the log holds before this search adds any
        self._lock = _Lock(path) if path is not None else None
        try:
            same = resume is not None and path is not None and path.resolve() == resume.resolve()
            if resume is not None:
                self._read(resume, repair=same)
            if path is not None and not same:
                path.write_text(json.dumps({"header": header}) + "\n")
                for trial in self.cache.values():  # carry resumed trials over to the new log
                    self._append(trial)
        except OSError as exc:
            self.close()
            raise InputError(f"Cannot write the trials log {path}: {exc.strerror or exc}.") from None
        except BaseException:
            self.close()
            raise
        if not same:
            self.resumed = len(self.cache)  # the new log holds each resumed trial once

    def __enter__(self) -> "TrialLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _read(self, path: Path, repair: bool) -> None:
        if not path.is_file():
            raise InputError(f"--resume {path}: no such trials log.")
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            raise InputError(f"--resume {path}: cannot read it ({exc.strerror or exc}).") from None
        try:
            header = json.loads(lines[0])["header"]
            if not isinstance(header, dict):
                raise TypeError("the header is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"--resume {path}: line 1 is not the header of a trials log written by aligner precision "
                             f"({exc}); start a new log instead.") from None
        for key in ("model_sha", "target", "accept", "samples"):
            if header.get(key) != self.header.get(key):
                raise InputError(f"--resume {path}: it was written for a different search ({key}: {header.get(key)!r} "
                                 f"vs now {self.header.get(key)!r}); start a new log instead.")
        keep, start = len(lines[0]), len(lines[0]) + 1  # keep: bytes through the last complete line
        last = max((i for i, line in enumerate(lines) if line.strip()), default=0)
        for number, line in enumerate(lines[1:], start=2):
            line_start, start = start, start + len(line) + 1
            if not line.strip():
                continue
            try:
                trial = _trial(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
                if number - 1 < last:
                    raise InputError(f"--resume {path}: line {number} is not a trial ({exc}); the log is damaged, "
                                     "start a new log instead.") from None
                log.warning("%s: dropped the torn last line %d (the search was killed while writing it): %s",
                            path, number, exc)
                break
            self.cache[trial.pins] = trial
            self.resumed += 1
            keep = line_start + len(line)
        if repair:  # appending goes on from the last complete trial
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.seek(keep)
                f.write(b"\n")

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


def _trial(row: dict) -> Trial:
    pins, passed = row["pins"], row["passed"]
    if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins) or not isinstance(passed, bool):
        raise TypeError("'pins' must be a list of node names and 'passed' true or false")
    return Trial(frozenset(pins), passed, row.get("phase", ""), row.get("metrics", {}), row.get("culprit"),
                 row.get("error", ""), row.get("seconds", 0.0), row.get("reason", ""))


class _Lock:
    """An exclusive, non-blocking ``flock`` on ``PATH.lock``: one writer per trials log."""

    def __init__(self, target: Path):
        import fcntl

        check_output_path(target)
        self.path = target.with_name(target.name + ".lock")
        for _ in range(5):  # the holder may remove the file between our open and our lock: retry
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise InputError(f"Cannot write the trials log {target}: {exc.strerror or exc} ({self.path}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise InputError(f"{target} is being written by another aligner precision search (lock {self.path} held"
                                 f"{f' by pid {holder}' if holder else ''}); wait for it to finish or give this search "
                                 "another --out / --trials path.") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise InputError(f"Could not lock {self.path}: other processes keep replacing it.")

    def release(self) -> None:
        try:
            os.unlink(self.path)  # before unlocking: a waiter that opened this file sees it gone and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)


__all__ = ["Pin", "PrecisionPlan", "TRT_CAVEAT", "TrialLog", "flop_fraction"]
