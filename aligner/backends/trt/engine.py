"""TensorRT (10.x / 11.x, ``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``): parse, mark, build.

Precision goes in through the ONNX itself: aligner's precision rewrite puts explicit Casts at
every FP32/low-precision boundary and the network is created *strongly typed*, which is the only
way on TensorRT 11 (per-layer precision flags are gone) and what TensorRT-RTX does. ``mark``
makes chosen intermediate tensors outputs (the frontier bisect marks a handful, never all).

What runs where (see the README): full TensorRT is not installable on the machines of this
project; TensorRT-RTX builds on the GPU machine but does not execute on compute capability 9.0,
so engines are built and serialized here, not run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx

from aligner.errors import MissingDependencyError, TargetError, TargetRunError
from aligner.graph.model import ModelGraph
from aligner.plugin import has_plugins

MODULES = ("tensorrt", "tensorrt_rtx")
# Runtime options of trt:* targets: builder settings (aligner build records them in the engine's sidecar).
TRT_OPTIONS = {
    "builder_optimization_level": "0-5: how long the builder searches tactics (TensorRT's default 3)",
    "workspace_mb": "workspace memory pool limit in MiB",
    "timing_cache": "timing cache file, read and updated",
    "tactic_sources": "the tactic sources the builder may use, joined by '+' (TensorRT's TacticSource names, e.g. "
                      "CUBLAS+CUDNN+EDGE_MASK_CONVOLUTIONS+JIT_CONVOLUTIONS); default: TensorRT's",
}


def load_tensorrt():
    """The TensorRT module: ``ALIGNER_TENSORRT`` (tensorrt or tensorrt_rtx), else the first installed."""
    wanted = os.environ.get("ALIGNER_TENSORRT")
    for name in ([wanted] if wanted else list(MODULES)):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("tensorrt", "tensorrt", "Building TensorRT engines (TensorRT 10+/11, or tensorrt_rtx for TensorRT-RTX)")


@dataclass(frozen=True)
class ParseFailure:
    node: str
    op_type: str
    index: int
    why: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node!r} (node #{self.index}): {self.why}"


@dataclass(frozen=True)
class Engine:
    data: bytes
    module: str  # tensorrt or tensorrt_rtx
    version: str
    outputs: tuple[str, ...]
    unmarked: tuple[str, ...]  # asked for, but no network tensor has that name (fused or removed by the parser)
    unmatched_pins: tuple[str, ...] = ()  # --layer-precision: pins no layer carries the name of


def parse(model: onnx.ModelProto, trt=None, strongly_typed: bool = True):
    """(trt, builder, network, parser, logger) for ``model``; parser errors become one TargetError
    naming each failing node (op type, name, index, why)."""
    trt = trt or load_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None and strongly_typed:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    if not ok or parser.num_errors:
        failures = [_failure(parser.get_error(i), model) for i in range(parser.num_errors)]
        listed = "; ".join(str(f) for f in failures[:10])
        raise TargetError(f"{trt.__name__} {trt.__version__} could not parse {len(failures)} node(s): {listed}")
    return trt, builder, network, parser, logger


def _failure(error, model: onnx.ModelProto) -> ParseFailure:
    index = int(error.node()) if hasattr(error, "node") else -1
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    if 0 <= index < len(model.graph.node):
        name = name or model.graph.node[index].name
        op = op or model.graph.node[index].op_type
    return ParseFailure(name, op, index, error.desc())


def mark_outputs(network, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Mark ``names`` as network outputs: (marked, not found)."""
    by_name = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            by_name[layer.get_output(j).name] = layer.get_output(j)
    existing = {network.get_output(i).name for i in range(network.num_outputs)}
    marked, missing = [], []
    for name in names:
        if name in existing:
            continue
        tensor = by_name.get(name)
        if tensor is None:
            missing.append(name)
        else:
            network.mark_output(tensor)
            marked.append(name)
    return marked, missing


def build_engine(graph: ModelGraph, precision: str = "fp32", fp32_nodes: Iterable[str] = (),
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None, mark: Iterable[str] = (),
                 plugins: Iterable[str] = (), timing_cache: str | os.PathLike | None = None,
                 layer_precision: bool = False, options: Mapping[str, str] | None = None) -> Engine:
    """A serialized engine of ``graph`` in ``precision`` (fp32, fp16, bf16; ``fp32_nodes`` stay FP32),
    built strongly typed from aligner's rewrite (or, with ``layer_precision``, TensorRT ≤ 10's
    per-layer precision constraints on the FP32 graph), with ``mark`` tensors as extra outputs,
    plugin libraries loaded first, a timing cache read from and saved to ``timing_cache``, and the
    builder settings of ``options`` (:data:`TRT_OPTIONS`; its ``timing_cache`` wins)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(TRT_OPTIONS))
    if unknown:
        raise TargetError(f"Unknown TensorRT option(s) {unknown}; known: {', '.join(TRT_OPTIONS)}.")
    timing_cache = options.get("timing_cache", timing_cache)
    trt = load_tensorrt()
    _load_plugins(trt, graph, plugins)
    model = graph.model
    if precision not in ("fp32", "fp16", "bf16"):
        raise TargetError(f"trt:{precision}: aligner builds trt:fp32, trt:fp16 and trt:bf16 (precision through explicit Casts).")
    if precision != "fp32" and not layer_precision:
        from aligner.graph.precision import rewrite_precision

        model = rewrite_precision(graph, list(fp32_nodes), precision).model
    trt, builder, network, _parser, _logger = parse(model, trt, strongly_typed=not layer_precision)
    _, missing = mark_outputs(network, mark)
    config = builder.create_builder_config()
    if hasattr(trt, "ProfilingVerbosity"):  # layer information names each layer's ONNX nodes and tensors
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _apply_options(trt, config, options)
    unmatched: list[str] = []
    if layer_precision and precision != "fp32":
        unmatched = layer_precision_constraints(trt, network, config, precision, fp32_nodes)
    cache = None
    if timing_cache is not None:
        blob = open(timing_cache, "rb").read() if os.path.exists(timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if any(d < 0 for d in network.get_input(i).shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shape = tuple((input_shapes or {}).get(tensor.name, ()))
            if len(shape) != len(tensor.shape):
                raise TargetError(f"Input {tensor.name!r} has dynamic dims {tuple(tensor.shape)}; give its shape (--input-shapes NAME:DIMS).")
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise TargetRunError(f"{trt.__name__} {trt.__version__} failed to build the engine (see its log above).")
    if cache is not None:
        from pathlib import Path

        from aligner.inputs import write_atomic

        write_atomic(Path(timing_cache), bytes(cache.serialize()))
    outputs = tuple(network.get_output(i).name for i in range(network.num_outputs))
    return Engine(bytes(data), trt.__name__, trt.__version__, outputs, tuple(missing), tuple(unmatched))


def layer_information(trt, engine, context=None) -> dict | None:
    """The engine inspector's layer information as a dict (None if this TensorRT cannot say)."""
    import json

    try:
        inspector = engine.create_engine_inspector()
        if context is not None:
            inspector.execution_context = context
        return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except (AttributeError, ValueError, RuntimeError, TypeError):
        return None


def _load_plugins(trt, graph: ModelGraph, plugins: Iterable[str]) -> None:
    """Plugin libraries first, then aligner's own plugin creators when the graph has plugin nodes."""
    for library in plugins:
        if not os.path.exists(library):
            raise TargetError(f"Plugin library not found: {library}")
        trt.get_plugin_registry().load_library(str(library))
    if has_plugins(graph.model):  # aligner plugin nodes: the spec-driven IPluginV3 creators
        from aligner.plugin.trt import register_trt_plugins

        if not hasattr(trt.INetworkDefinition, "add_plugin_v3"):
            raise TargetError(f"{trt.__name__} {trt.__version__} cannot put plugin layers in a network (its INetworkDefinition has no "
                              "add_plugin_v3, and its ONNX parser aborts the process on a plugin node), so a model with aligner "
                              "plugin ops cannot be built with it; use TensorRT 10.x/11.x (ALIGNER_TENSORRT=tensorrt), or build the "
                              "model fused with standard ops only (--fuse layernorm).")
        register_trt_plugins(trt)


def _apply_options(trt, config, options: Mapping[str, str]) -> None:
    """Builder settings by name (TRT_OPTIONS); a value TensorRT cannot take is a TargetError."""
    try:
        if "builder_optimization_level" in options:
            level = int(options["builder_optimization_level"])
            if not 0 <= level <= 5:  # TensorRT-RTX 1.7 takes 9 without a word and records it
                raise ValueError(f"builder_optimization_level={level}: TensorRT's levels are 0-5")
            config.builder_optimization_level = level
        if "workspace_mb" in options:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(options["workspace_mb"]) * 2**20))
        if "tactic_sources" in options:
            config.set_tactic_sources(tactic_mask(trt, options["tactic_sources"]))
    except (ValueError, TypeError, AttributeError) as exc:
        raise TargetError(f"{trt.__name__} {trt.__version__} cannot take the builder options {dict(options)}: {exc}") from None


def tactic_mask(trt, text: str) -> int:
    """The bit mask ``IBuilderConfig.set_tactic_sources`` takes, from '+'-joined TacticSource names."""
    known = {n for n in dir(getattr(trt, "TacticSource", object)) if n.isupper()}
    names = [n.strip().upper() for n in text.split("+") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise TargetError(f"tactic_sources={text!r}: {trt.__name__} {trt.__version__} knows "
                          f"{'+'.join(sorted(known)) or 'no tactic sources'}" + (f" (not {', '.join(unknown)})" if unknown else ""))
    mask = 0
    for name in names:
        mask |= 1 << int(getattr(trt.TacticSource, name))
    return mask


def layer_precision_constraints(trt, network, config, precision: str, fp32_nodes: Iterable[str]) -> list[str]:
    """TensorRT ≤ 10's legacy path: FP16/BF16 builder flag, precision constraints obeyed, and every
    layer of a pinned ONNX node (the parser names layers after their node; helper layers it adds
    carry the node name plus a suffix) forced to FP32 with FP32 outputs. Returns the pins that
    matched no layer (TensorRT fused or renamed them). TensorRT 11 and TensorRT-RTX dropped these
    flags: there the strongly typed build is the only way."""
    flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
    if not hasattr(trt.BuilderFlag, flag) or not hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
        raise TargetError(f"{trt.__name__} {trt.__version__} has no per-layer precision flags (BuilderFlag.{flag} / "
                          "OBEY_PRECISION_CONSTRAINTS are gone in TensorRT 11 and TensorRT-RTX): build strongly typed "
                          "(the default, without --layer-precision).")
    config.set_flag(getattr(trt.BuilderFlag, flag))
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pins = set(fp32_nodes)
    matched = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        owner = next((p for p in pins if layer.name == p or layer.name.startswith(p + "_") or layer.name.startswith(p + "/")), None)
        if owner is None:
            continue
        matched.add(owner)
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output_type(j) in (trt.float16, getattr(trt, "bfloat16", trt.float16), trt.float32):
                layer.set_output_type(j, trt.float32)
    return sorted(pins - matched)


__all__ = ["TRT_OPTIONS", "Engine", "ParseFailure", "build_engine", "layer_information", "layer_precision_constraints", "load_tensorrt", "mark_outputs", "parse"]
