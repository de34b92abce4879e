"""``bench``: latency and throughput of a model per target and batch size, side by side.

Every target is timed by its runner (:func:`aligner.backends.make_runner`): ONNX Runtime
(``ort:*``, sessions built in one place with the target's runtime options), TensorRT (``trt:*``)
and PyTorch eager (``torch:*``, given the module). Warm-up, then timed runs; on CUDA the inputs
and outputs stay on the GPU and each run is synchronised before the clock is read. Reports
median / p90 / p99 latency, throughput (items/s) and the GPU memory in use (NVML, when present).
Each row names its target in full: plan file and runtime options included.

A **precision inversion** — a lower precision (fp16/bf16 below tf32 below fp32) slower than a
higher one of the same runtime and device at the same batch, by more than the tuner's noise band
— is reported with both medians and the option to try (:func:`precision_inversions`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner.backends import backend_of, backends, make_runner
from aligner.backends.target import Target
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs, validate_feeds
from aligner.tune import NOISE



@dataclass(frozen=True)
class BenchRow:
    target: str  # the full target: str(Target), with +plan and @options
    batch: int
    latency_ms: dict[str, float]  # median, p90, p99, mean
    throughput: float  # items per second at the median latency
    runs: int
    gpu_memory_mb: float | None = None  # peak GPU memory of this target (see bench())

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class Inversion:
    """A lower precision measured slower than a higher one (same runtime, device and batch)."""

    batch: int
    lower: str  # the lower-precision target, in full
    lower_ms: float  # its median latency
    higher: str  # the fastest higher-precision target that beat it
    higher_ms: float
    advice: str

    @property
    def message(self) -> str:
        return (f"precision inversion at batch {self.batch}: {self.lower} takes {self.lower_ms:.3f} ms, slower than "
                f"{self.higher} at {self.higher_ms:.3f} ms ({self.lower_ms / self.higher_ms:.2f}x); {self.advice}")

    def to_dict(self) -> dict:
        return {"batch": self.batch, "lower": self.lower, "lower_ms": self.lower_ms, "higher": self.higher,
                "higher_ms": self.higher_ms, "slowdown": self.lower_ms / self.higher_ms, "advice": self.advice, "message": self.message}


@dataclass(frozen=True)
class BenchResult:
    device: str
    model: str
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()
    inversions: tuple[Inversion, ...] = ()

    def to_dict(self) -> dict:
        return {"device": self.device, "model": self.model, "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes),
                "inversions": [i.to_dict() for i in self.inversions]}


PRECISION_RANK = {"fp32": 0, "tf32": 1, "fp16": 2, "bf16": 2, "autocast": 2, "int8": 3}  # higher is lower precision


def precision_inversions(rows: Sequence[BenchRow], targets: Mapping[str, Target], noise: float = NOISE) -> tuple[Inversion, ...]:
    """Each row slower by more than ``noise`` than a higher-precision row of the same runtime, device
    and batch, against the fastest such row; ``targets`` maps each row's ``target`` to its Target."""
    found = []
    for row in rows:
        low = targets[row.target]
        faster = [r for r in rows if r.batch == row.batch and (targets[r.target].runtime, targets[r.target].device) == (low.runtime, low.device)
                  and PRECISION_RANK.get(targets[r.target].precision, 0) < PRECISION_RANK.get(low.precision, 0)
                  and row.latency_ms["median"] > r.latency_ms["median"] * (1 + noise)]
        if faster:
            best = min(faster, key=lambda r: r.latency_ms["median"])
            found.append(Inversion(row.batch, row.target, row.latency_ms["median"], best.target, best.latency_ms["median"], _advice(low)))
    return tuple(found)


def _advice(target: Target) -> str:
    """The option to try when ``target`` is slower than a higher precision (its runtime's advice)."""
    return backend_of(target).advice(target)


def bench(model: ModelGraph | str | Path, targets: Iterable[str | Target], batches: Iterable[int] = (1,),
          plan: str | Path | None = None, runs: int = 100, warmup: int = 10,
          progress: Callable[[str, int, int], None] | None = None, torch_module=None, *,
          inputs: Mapping[str, np.ndarray] | None = None, shapes: Mapping[str, Sequence[int]] | None = None) -> BenchResult:
    """Time ``model`` on each target and batch size: ``inputs`` when given (their samples repeated
    along a symbolic batch dimension to each batch size), else generated inputs whose symbolic dims
    take their sizes from ``shapes`` (``{name: dims}``, as ``--input-shapes``), the batch dim set.

    ``plan`` is the plan file of ``+plan`` targets; ``torch:*`` targets time ``torch_module``
    eagerly on the same inputs. Peak GPU memory per row: PyTorch's ``max_memory_allocated`` for
    ``torch:cuda:*`` (reset per row); for ``ort:cuda:*`` and ``trt:*``, the device memory in use
    after the runs minus before the runner was made (NVML) — ONNX Runtime's arena keeps its
    high-water mark, so this is the target's peak footprint; the first CUDA session of a process
    also carries the CUDA context (~0.5 GiB)."""
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    if plan is not None and not isinstance(plan, (str, Path)):
        raise InputError("plan is the plan file of +plan targets (aligner precision --out); for FP32 nodes in hand pass "
                         "Target.parse(spec, pins=nodes) as the target.")
    parsed = [Target.parse(t, plan=plan) for t in targets]  # every spec checked before any timing
    for target in parsed:
        runtime = backend_of(target)
        if not runtime.timed:
            deployed = runtime.deploys_as(target)
            timed = ", ".join(f"{b.title} ({name}:*)" for name, b in backends().items() if b.timed)
            raise InputError(f"aligner bench times {timed} targets; {target} is {runtime.title} (its speed means nothing)."
                             + (f" Time {deployed.base} instead." if deployed is not None and deployed != target else ""))
    batches, notes = _batches(graph, batches)
    rows, total = [], len(parsed) * len(batches)
    for target in parsed:
        for batch, times, memory in _time_target(graph, target, batches, runs, warmup, torch_module, inputs, shapes):
            rows.append(_row(str(target), batch, times, runs, memory))
            if progress:
                progress(str(target), len(rows), total)
    device = "cuda" if any(t.device == "cuda" for t in parsed) else "cpu"
    inversions = precision_inversions(rows, {str(t): t for t in parsed})
    return BenchResult(_device_name(device), str(graph.path or "<in-memory>"), tuple(rows), tuple(notes), inversions)


def _batches(graph: ModelGraph, batches: Iterable[int]) -> tuple[list[int], list[str]]:
    batches = sorted(set(batches))
    if not batches or batches[0] < 1:
        raise InputError(f"Batch sizes must be whole numbers >= 1; got {batches}.")
    first = graph.tensor(graph.input_names[0]).shape or ()
    fixed = first[0] if first and isinstance(first[0], int) else None
    if fixed is not None and batches != [fixed]:
        return [fixed], [f"the model's batch dimension is fixed at {fixed}; only batch {fixed} was timed"]
    return batches, []


def _time_target(graph: ModelGraph, target: Target, batches: list[int], runs: int, warmup: int,
                 torch_module, inputs=None, shapes=None) -> Iterator[tuple[int, list[float], float | None]]:
    """(batch, latencies in ms, peak GPU MiB) per batch, from the target's runner."""
    eager = not backend_of(target).runs_onnx  # PyTorch: the module, its own allocator's peak
    on_torch_gpu = eager and target.device == "cuda"
    base = _gpu_memory_mb() if target.device == "cuda" and not on_torch_gpu else None
    runner = make_runner(graph, target, module=torch_module if eager else None)
    for batch in batches:
        if on_torch_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats()
        times = runner.time(_batch_feeds(graph, batch, inputs, shapes), runs, warmup)
        if on_torch_gpu:
            import torch

            memory = torch.cuda.max_memory_allocated() / 2**20
        else:
            memory = _since(base) if target.device == "cuda" else None
        yield batch, times, memory


def _row(target: str, batch: int, times: list[float], runs: int, memory_mb: float | None) -> BenchRow:
    times = sorted(times)
    median = statistics.median(times)
    pct = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    return BenchRow(target, batch, {"median": median, "p90": pct(0.9), "p99": pct(0.99), "mean": float(np.mean(times))},
                    batch * 1e3 / median, runs, memory_mb)


def _batch_feeds(graph: ModelGraph, batch: int, inputs: Mapping[str, np.ndarray] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Inputs of one batch size: ``inputs`` with their samples repeated (or cut) to ``batch`` along a
    symbolic leading dim, else generated ones, symbolic dims from ``shapes``, the leading one ``batch``."""
    symbolic = {i.name: bool(i.shape) and not (isinstance(i.shape[0], int) and i.shape[0] > 0) for i in graph.input_infos()}
    if inputs is not None:
        inputs = validate_feeds(graph, dict(inputs))
        return {k: np.take(v, np.arange(batch) % len(v), axis=0) if symbolic[k] and v.ndim and len(v) else v for k, v in inputs.items()}
    given = {k: tuple(v) for k, v in (shapes or {}).items()}
    out = {}
    for i in graph.input_infos():
        dims = list(given.get(i.name, i.shape or ()))
        if symbolic[i.name] and dims:
            dims[0] = batch
        if all(isinstance(d, int) and d > 0 for d in dims) or i.name in given:
            out[i.name] = tuple(dims)
    return make_inputs(graph, out)


def _gpu_memory_mb() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def _since(base: float | None) -> float | None:
    now = _gpu_memory_mb()
    return None if base is None or now is None else max(now - base, 0.0)


def _device_name(device: str) -> str:
    if device == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            return str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
        except Exception:  # noqa: BLE001
            return "cuda"
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


__all__ = ["BenchResult", "BenchRow", "Inversion", "PRECISION_RANK", "bench", "precision_inversions"]
