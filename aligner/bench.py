"""``bench``: latency and throughput of a model per target and batch size, side by side.

Every target is timed by its runner (:func:`aligner.backends.make_runner`): ONNX Runtime
(``ort:*``, sessions built in one place with the target's runtime options), TensorRT (``trt:*``)
and PyTorch eager (``torch:*``, given the module). Warm-up, then timed runs; on CUDA the inputs
and outputs stay on the GPU and each run is synchronised before the clock is read. Reports
median / p90 / p99 latency, throughput (items/s) and the GPU memory in use (NVML, when present).
Each row names its target in full: plan file and runtime options included.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner.backends import make_runner
from aligner.backends.target import Target
from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs

TIMED_RUNTIMES = ("ort", "trt", "torch")


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
class BenchResult:
    device: str
    model: str
    rows: tuple[BenchRow, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"device": self.device, "model": self.model, "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes)}


def bench(model: ModelGraph | str | Path, targets: Iterable[str | Target], batches: Iterable[int] = (1,),
          plan: str | Path | None = None, runs: int = 100, warmup: int = 10,
          progress: Callable[[str, int, int], None] | None = None, torch_module=None) -> BenchResult:
    """Time ``model`` on each target and batch size (generated inputs, the batch dimension set).

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
        if target.runtime not in TIMED_RUNTIMES:
            raise InputError(f"aligner bench times ONNX Runtime (ort:*), TensorRT (trt:*) and PyTorch (torch:*) targets; "
                             f"{target} is the {target.runtime} runtime (an emulator: its speed means nothing). "
                             f"Time ort:cpu:{target.precision} instead.")
    batches, notes = _batches(graph, batches)
    rows, total = [], len(parsed) * len(batches)
    for target in parsed:
        for batch, times, memory in _time_target(graph, target, batches, runs, warmup, torch_module):
            rows.append(_row(str(target), batch, times, runs, memory))
            if progress:
                progress(str(target), len(rows), total)
    device = "cuda" if any(t.device == "cuda" for t in parsed) else "cpu"
    return BenchResult(_device_name(device), str(graph.path or "<in-memory>"), tuple(rows), tuple(notes))


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
                 torch_module) -> Iterator[tuple[int, list[float], float | None]]:
    """(batch, latencies in ms, peak GPU MiB) per batch, from the target's runner."""
    on_torch_gpu = target.runtime == "torch" and target.device == "cuda"
    base = _gpu_memory_mb() if target.device == "cuda" and not on_torch_gpu else None
    runner = make_runner(graph, target, module=torch_module if target.runtime == "torch" else None)
    for batch in batches:
        if on_torch_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats()
        times = runner.time(_batch_feeds(graph, batch), runs, warmup)
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


def _batch_feeds(graph: ModelGraph, batch: int) -> dict:
    """Generated inputs with the symbolic leading dims set to ``batch`` (fixed dims kept)."""
    shapes = {i.name: tuple(batch if k == 0 and not isinstance(d, int) else d for k, d in enumerate(i.shape or ())) for i in graph.input_infos()}
    return make_inputs(graph, {k: v for k, v in shapes.items() if all(isinstance(d, int) for d in v)})


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


__all__ = ["BenchResult", "BenchRow", "TIMED_RUNTIMES", "bench"]
