"""``trt:*`` runner: build an engine per capture set (captured tensors marked as outputs), run it.

Captures are what the frontier bisect asks for — a handful of tensors per probe — so each probe is
one engine build with those tensors marked; asking for every tensor would mark them all and
defeat TensorRT's fusions (``compare --target trt:*`` compares the outputs unless ``--tensors``
names some). A captured tensor that TensorRT fused away has no counterpart and is reported as
such. Buffers are torch CUDA tensors; execution is ``execute_async_v3`` on a torch stream.

Engines are built with detailed profiling verbosity, so the uncaptured engine's layer information
(engine inspector, JSON) says which ONNX nodes each layer computes and which tensors it writes:
the ``boundaries`` capture policy (the default) captures only those tensors, so probes keep the
engine's fusions (:func:`aligner.graph.deployed.kernels_of_trt`).

What ran where: the build and the refusal to deserialize on compute capability 9.0 (TensorRT-RTX,
H200) are verified; the execution path after deserialization could not be run on these machines
(README).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aligner.backends.base import InputInfo, capture_policy, check_capture, check_options, describe_model_inputs
from aligner.backends.target import Target
from aligner.errors import TargetRunError
from aligner.graph.model import ModelGraph


class TrtRunner:
    """``graph`` on a ``trt:*`` target; runtime options are builder settings (``TRT_OPTIONS``)."""

    def __init__(self, graph: ModelGraph, target: Target):
        from aligner.backends.trt.engine import TRT_OPTIONS, load_tensorrt

        self.target, self.graph, self.fp32_nodes = target, graph, list(target.pins)
        self.options = check_options(target, TRT_OPTIONS)
        self.label = str(target)
        self.trt = load_tensorrt()
        self.input_names = list(graph.input_names)
        self.output_names = list(graph.output_names)
        self._every = frozenset({o for n in graph.nodes for o in n.output if o} | set(self.input_names))
        self.fuses = True  # TensorRT fuses layers: captures are checked against an uncaptured run
        self.capture_policy = capture_policy(target)
        self._layers: dict | None = None  # the uncaptured engine's layer information (inspector JSON)
        self._written: frozenset[str] | None = None  # the tensors its layers write (capturable under boundaries)
        self._key: tuple[str, ...] | None = None
        self._engine = self._context = None

    @property
    def capturable(self) -> frozenset[str]:
        """``boundaries`` (default): the tensors the uncaptured engine's layers write, once its layer
        information has been read (:meth:`layer_information`); ``outputs``; ``all``: every tensor
        (marking them undoes TensorRT's fusions; the perturbation check says so)."""
        if self.capture_policy == "all":
            return self._every
        if self.capture_policy == "boundaries" and self._layers is not None:
            if self._written is None:  # asked once per tensor by the searches: computed once
                from aligner.graph.deployed import kernels_of_trt

                written = {t for _, _, outs, _ in kernels_of_trt(self._layers) for t in outs}
                self._written = self._every & (written | set(self.output_names) | set(self.input_names))
            return self._written
        return frozenset(self.output_names) | set(self.input_names)

    def layer_information(self, feeds: dict[str, np.ndarray]) -> dict | None:
        """The uncaptured engine's layer information: TensorRT's engine inspector, JSON format, from
        an engine built with detailed profiling verbosity (every layer, its ONNX nodes, its tensors);
        None when this TensorRT gives none (captures then fall back to the graph outputs)."""
        self._prepare((), feeds)
        return self._layers

    def _prepare(self, capture: tuple[str, ...], feeds: dict[str, np.ndarray]) -> None:
        key = (capture, tuple(sorted((k, tuple(np.shape(v))) for k, v in feeds.items())))
        if self._key == key and self._context is not None:
            return
        from aligner.backends.trt.engine import build_engine

        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        engine = build_engine(self.graph, self.target.precision, self.fp32_nodes, shapes, mark=capture, options=self.options)
        self.unmarked = set(engine.unmarked)
        logger = CollectingLogger(self.trt)
        runtime = self.trt.Runtime(logger)
        self._engine = runtime.deserialize_cuda_engine(engine.data)
        if self._engine is None:
            said = "; ".join(logger.messages[-2:]) or "no message"
            raise TargetRunError(f"{self.label}: {self.trt.__name__} {self.trt.__version__} refused to load the engine it built: {said}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise TargetRunError(f"{self.label}: could not create an execution context: {'; '.join(logger.messages[-2:])}")
        if not capture and self._layers is None:
            from aligner.backends.trt.engine import layer_information

            self._layers = layer_information(self.trt, self._engine, self._context)
        self._key = key

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        import torch

        capture = check_capture(capture, self._every)
        wanted = [c for c in capture if c not in self.input_names] if capture else self.output_names
        self._prepare(tuple(c for c in wanted if c not in self.output_names), feeds)
        missing = [c for c in wanted if c in self.unmarked]
        if missing:
            raise TargetRunError(f"{self.label}: TensorRT fused away {missing[:5]} (no network tensor of that name): capture neighbours instead")
        buffers = self._bind(feeds)
        stream = torch.cuda.Stream()
        self._execute(stream)
        stream.synchronize()
        out = {c: buffers[c].float().cpu().numpy() if buffers[c].dtype in (torch.float16, torch.bfloat16) else buffers[c].cpu().numpy()
               for c in wanted}
        out.update({c: feeds[c] for c in capture if c in self.input_names})
        return out

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return describe_model_inputs(self.graph.model)

    def _bind(self, feeds: dict[str, np.ndarray]) -> dict:
        """torch CUDA buffers for every I/O tensor of the current engine, inputs filled, addresses set."""
        import torch

        trt, engine, context = self.trt, self._engine, self._context
        torch_type = lambda name: torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype  # noqa: E731
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        buffers = {}
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                array = np.ascontiguousarray(feeds[name])
                context.set_input_shape(name, array.shape)
                buffers[name] = torch.from_numpy(array).to("cuda", torch_type(name))
        for name in names:
            if name not in buffers:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise TargetRunError(f"{self.label}: output {name!r} has a data-dependent shape {shape}; aligner's TensorRT runner needs static output shapes")
                buffers[name] = torch.empty(shape, dtype=torch_type(name), device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    def _execute(self, stream) -> None:
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise TargetRunError(f"{self.label}: execute_async_v3 failed")

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        """Milliseconds per run (CUDA events around each execute_async_v3; I/O stays on the GPU)."""
        import torch

        self._prepare((), feeds)
        self._bind(feeds)
        stream = torch.cuda.Stream()
        for _ in range(warmup):
            self._execute(stream)
        stream.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._execute(stream)
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


class CollectingLogger:
    """A TensorRT logger (of the given ``trt`` module) that keeps the messages in ``.messages``
    (the refusal reasons end up in errors)."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages = []

            def log(self, severity, msg):
                self.messages.append(str(msg))

        return Logger()


__all__ = ["CollectingLogger", "TrtRunner"]
