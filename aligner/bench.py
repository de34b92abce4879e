"""``bench``: latency and throughput of a model on ONNX Runtime targets, per batch size.

Warm-up, then timed runs; on CUDA the inputs and outputs are bound on the GPU (I/O binding), so a
run is the model alone, and the outputs are synchronised before the host clock is read. Reports
median / p90 / p99 latency, throughput (items/s) and the GPU memory in use (NVML, when present).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner.errors import InputError, TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs
from aligner.search.plan import plan_target


@dataclass(frozen=True)
class BenchRow:
    target: str
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


def _model_for(graph: ModelGraph, spec: str, plan: Sequence[str]):
    target, pins = plan_target(spec, plan)
    if target.runtime != "ort":
        raise InputError(f"aligner bench times ONNX Runtime (ort:*), TensorRT (trt:*) and PyTorch (torch:*) targets; {spec!r} is not one.")
    if target.precision in ("fp32", "tf32"):
        return target, graph.model
    from aligner.graph.precision import rewrite_precision

    return target, rewrite_precision(graph, pins, target.precision).model


def ort_session(model, target):
    import onnxruntime as ort

    from aligner.backends.onnxruntime import providers_for

    from aligner.plugin.ort import for_session

    options = ort.SessionOptions()
    options.log_severity_level = 3
    model, has_plugin_ops = for_session(model, options)
    # timed: no silent fallback to the CPU, except for plugin ops, which are CPU custom ops
    providers = providers_for(target, cpu_fallback=has_plugin_ops)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        raise TargetRunError(f"{target}: ONNX Runtime could not build the model: {str(exc)[:300]}") from None


def _gpu_memory_mb() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def time_session(session, feeds: dict, device: str, runs: int, warmup: int) -> list[float]:
    """Latencies in ms of ``runs`` runs after ``warmup``."""
    import onnxruntime as ort

    if device == "cuda":
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def once():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        names = [o.name for o in session.get_outputs()]

        def once():
            session.run(names, feeds)

    from aligner.plugin.ort import take_errors

    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        once()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if i == 0 and (errors := take_errors()):
            raise TargetRunError(f"a plugin op failed on the generated inputs: {'; '.join(errors[:3])}")
    return times


def time_torch(module, shape: tuple[int, ...], spec: str, runs: int, warmup: int) -> list[float]:
    """Latencies in ms of eager PyTorch on ``spec`` (torch:cuda:fp32|tf32|fp16|bf16|autocast, torch:cpu:fp32)."""
    import copy

    import torch

    _, device, precision = spec.split(":")
    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "autocast": torch.float32}
    if precision not in dtypes:
        raise InputError(f"Unknown PyTorch target {spec!r}: torch:cpu:fp32 or torch:cuda:fp32|tf32|fp16|bf16|autocast.")
    model = copy.deepcopy(module).eval().to(device=device, dtype=dtypes[precision])
    x = (torch.rand(shape) * 255).to(device=device, dtype=dtypes[precision])
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ctx = torch.autocast("cuda", dtype=torch.float16) if precision == "autocast" else torch.no_grad()
    times = []
    try:
        with torch.no_grad(), ctx:
            for i in range(warmup + runs):
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return times


def _row(spec: str, batch: int, times: list[float], runs: int, memory_mb: float | None) -> BenchRow:
    times = sorted(times)
    median = statistics.median(times)
    pct = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]  # noqa: E731
    return BenchRow(spec, batch, {"median": median, "p90": pct(0.9), "p99": pct(0.99), "mean": float(np.mean(times))},
                    batch * 1e3 / median, runs, memory_mb)


def _torch_peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _since(base: float | None) -> float | None:
    now = _gpu_memory_mb()
    return None if base is None or now is None else max(now - base, 0.0)


def _batch_feeds(graph: ModelGraph, batch: int) -> dict:
    """Generated inputs with the symbolic leading dims set to ``batch`` (fixed dims kept)."""
    shapes = {i.name: tuple(batch if k == 0 and not isinstance(d, int) else d for k, d in enumerate(i.shape or ())) for i in graph.input_infos()}
    return make_inputs(graph, {k: v for k, v in shapes.items() if all(isinstance(d, int) for d in v)})


def _timer(graph: ModelGraph, spec: str, plan: Sequence[str], runs: int, warmup: int, torch_module, device: str):
    """(batch -> latencies in ms, () -> peak GPU MiB of the last batch, device) for one target."""
    if spec.startswith("torch:"):
        if torch_module is None:
            raise InputError(f"Target {spec!r} times PyTorch eager: give the module (--torch MODULE:FUNCTION).")
        on = spec.split(":")[1]

        def time_batch(b):
            import torch

            if on == "cuda":
                torch.cuda.reset_peak_memory_stats()
            shape = tuple(b if k == 0 else d for k, d in enumerate(graph.tensor(graph.input_names[0]).shape or ()))
            return time_torch(torch_module, shape, spec, runs, warmup)

        return time_batch, lambda: _torch_peak_mb(on), device
    if spec.startswith("trt"):
        from aligner.backends.trt_runner import TrtRunner

        target, pins = plan_target(spec, plan)
        base = _gpu_memory_mb()
        runner = TrtRunner(graph, target, pins)  # one engine per batch size (static shapes)
        return lambda b: runner.time(_batch_feeds(graph, b), runs, warmup), lambda: _since(base), "cuda"
    target, prepared = _model_for(graph, spec, plan)
    base = _gpu_memory_mb() if target.device == "cuda" else None
    session = ort_session(prepared, target)
    return (lambda b: time_session(session, _batch_feeds(graph, b), target.device, runs, warmup),
            lambda: _since(base) if target.device == "cuda" else None, "cuda" if target.device == "cuda" else device)


def bench(model: ModelGraph | str | Path, targets: Iterable[str], batches: Iterable[int] = (1,), plan: Sequence[str] = (),
          runs: int = 100, warmup: int = 10, progress: Callable[[str, int, int], None] | None = None,
          torch_module=None) -> BenchResult:
    """Time ``model`` on each target and batch size; ``torch:*`` targets time ``torch_module`` eagerly
    on inputs of the ONNX model's input shape.

    Peak GPU memory per row: PyTorch's ``max_memory_allocated`` for ``torch:cuda:*`` (reset per
    row); for ``ort:cuda:*`` and ``trt:*``, the device memory in use after the runs minus before the
    session or engine was created (NVML) — ONNX Runtime's arena keeps its high-water mark, so this
    is the target's peak footprint; the first CUDA session of a process also carries the CUDA
    context (~0.5 GiB)."""
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    targets, batches = list(targets), sorted(set(batches))
    rows, notes = [], []
    first = graph.tensor(graph.input_names[0]).shape or ()
    fixed = first[0] if first and isinstance(first[0], int) else None
    if fixed is not None and batches != [fixed]:
        notes.append(f"the model's batch dimension is fixed at {fixed}; only batch {fixed} was timed")
        batches = [fixed]
    device = "cpu"
    total, done = len(targets) * len(batches), 0
    for spec in targets:
        timer, peak_mb, device = _timer(graph, spec, plan, runs, warmup, torch_module, device)
        for b in batches:
            rows.append(_row(spec, b, timer(b), runs, peak_mb()))
            done += 1
            if progress:
                progress(spec, done, total)
    return BenchResult(_device_name(device), str(graph.path or "<in-memory>"), tuple(rows), tuple(notes))


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


__all__ = ["BenchResult", "BenchRow", "bench", "ort_session", "time_session", "time_torch"]
