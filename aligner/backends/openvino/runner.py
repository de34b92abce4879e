"""``ov:*`` runner: the ONNX model compiled by OpenVINO for its CPU plugin, run as deployed.

OpenVINO reads the ONNX model (its ONNX frontend keeps the tensor names), transforms and fuses it,
and runs its own kernels: FP32, BF16 where the CPU has native BF16 (AVX-512 BF16 or AMX) and the
``INFERENCE_PRECISION_HINT`` asks for it, INT8 where the model carries Q/DQ pairs (its
low-precision transformations turn them into integer kernels). The compiled model's runtime model
lists every executed layer with the original operations it computes (``originalLayersNames``) and
the precision it ran in (``runtimePrecision``): that is the deployed graph
(:meth:`OvRunner.deployed_graph`), and the capture policy ``boundaries`` (the default) captures only
tensors that some executed layer writes, so a capture does not undo a fusion. Captures add the
tensors as outputs of a fresh copy of the model (one compiled model per capture set, the last few
kept). A hint the CPU cannot honour (bf16 on a CPU without BF16) runs another precision: the runner
says so (:attr:`OvRunner.ran_in`, a warning, and a note in every comparison).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

from aligner._optional import require
from aligner.backends.base import InputInfo, capture_policy, check_capture, check_options, choice_option, describe_model_inputs, \
    int_option, time_runs
from aligner.backends.target import Target
from aligner.errors import TargetError, TargetRunError

log = logging.getLogger(__name__)

# precision of an ov target -> OpenVINO's INFERENCE_PRECISION_HINT (int8: float compute around the Q/DQ's integer kernels)
HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
OV_OPTIONS = {
    "num_threads": "CPU threads OpenVINO's inference uses (INFERENCE_NUM_THREADS; default: all cores)",
    "performance_hint": "latency|throughput (PERFORMANCE_HINT; default latency: one stream, as a timing of one request)",
    "execution_mode": "performance|accuracy (EXECUTION_MODE_HINT; accuracy keeps FP32 where a hint would lower it)",
    "hint": "f32|f16|bf16: the inference precision asked for, overriding the target's (rarely needed)",
    "allow_f32": "1: run a low-precision target even where this CPU makes OpenVINO run it in f32 (default 0: refused, since "
                 "every verdict would be FP32's)",
}
MAX_COMPILED = 4  # compiled models kept (one per capture set)
_SAID: set[tuple[str, str]] = set()  # (target, precision run) warned about once per process


def ov_options(target: Target) -> dict[str, str]:
    """The target's OpenVINO options, checked (an unknown key is a TargetError listing these)."""
    options = check_options(target, OV_OPTIONS)
    if "num_threads" in options:
        int_option(target, "num_threads", options["num_threads"], minimum=1)
    if "performance_hint" in options:
        choice_option(target, "performance_hint", options["performance_hint"], ("latency", "throughput"))
    if "execution_mode" in options:
        choice_option(target, "execution_mode", options["execution_mode"], ("performance", "accuracy"))
    if "hint" in options:
        choice_option(target, "hint", options["hint"], ("f32", "f16", "bf16"))
    if "allow_f32" in options:
        choice_option(target, "allow_f32", options["allow_f32"], ("0", "1"))
    return options


def compile_config(target: Target) -> dict[str, str]:
    """OpenVINO's CPU properties for ``target``."""
    options = ov_options(target)
    config = {"INFERENCE_PRECISION_HINT": options.get("hint", HINTS[target.precision]).lower(),
              "PERFORMANCE_HINT": options.get("performance_hint", "latency").upper()}
    if "num_threads" in options:
        config["INFERENCE_NUM_THREADS"] = str(int(options["num_threads"]))
    if "execution_mode" in options:
        config["EXECUTION_MODE_HINT"] = options["execution_mode"].upper()
    return config


def _precision_name(value) -> str:
    """OpenVINO's element type as the hint writes it: f32, bf16, f16, i8, u8..."""
    text = str(getattr(value, "get_type_name", lambda: value)())
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


class OvRunner:
    """``model`` (an ONNX model, float or QDQ) on an ``ov:*`` target, OpenVINO's CPU plugin."""

    def __init__(self, model: onnx.ModelProto, target: Target, label: str = ""):
        self.ov = require("openvino", f"Target {target} (OpenVINO)")
        self.target, self.label = target, label or str(target)
        self.config = compile_config(target)
        self._dir = Path(tempfile.mkdtemp(prefix="aligner-ov-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._path = self._dir / "model.onnx"
        large = model.ByteSize() > 2**30 if model.ByteSize() >= 0 else True
        onnx.save(model, str(self._path), save_as_external_data=large, location="model.onnx.data" if large else None)
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]
        self._every = frozenset({o for n in model.graph.node for o in n.output if o} | set(self.input_names))
        self._nodes = {n.name: tuple(o for o in n.output if o) for n in model.graph.node if n.name}
        self._order = {n.name: i for i, n in enumerate(model.graph.node) if n.name}
        self._inputs = describe_model_inputs(model)
        self.core = self.ov.Core()
        self.fuses = True  # OpenVINO's transformations fuse: captures are checked against an uncaptured run
        self.capture_policy = capture_policy(target)
        self._compiled: dict[tuple[str, ...], object] = {}
        self._capturable: frozenset[str] | None = None
        self._layers: list[dict] | None = None
        self.ran_in: str | None = None  # the inference precision OpenVINO chose (it may not be the hint's)

    # -- compiling ---------------------------------------------------------------------------------------------
    def _compile(self, capture: tuple[str, ...]):
        if capture in self._compiled:
            return self._compiled[capture]
        try:
            model = self.core.read_model(str(self._path))
            if self.target.pins:
                keep_fp32(model, self.target.pins)
            extra = [c for c in capture if c not in self.output_names and c not in self.input_names]
            if extra:
                model.add_outputs(extra)
            compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with its own text
            raise TargetRunError(f"{self.label}: OpenVINO failed to compile the model: {_short(exc)}") from None
        if not capture and self.ran_in is None:
            self._check_hint(compiled)
        if len(self._compiled) >= MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        self._compiled[capture] = compiled
        return compiled

    def _check_hint(self, compiled) -> None:
        asked = self.config["INFERENCE_PRECISION_HINT"]
        self.ran_in = _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.ran_in == "f32" and asked != "f32" and self.target.option_dict.get("allow_f32", "0") != "1":
            raise TargetError(f"{self.label}: OpenVINO runs {asked} only on a CPU with native {asked.upper()} kernels; this one "
                              f"({_cpu_capabilities(self.core)}) would run f32, so every verdict would be FP32's. Use "
                              f"emu:{self.target.precision} for what {self.target.precision.upper()} computes, run on a CPU with "
                              f"{'AVX-512 BF16 or AMX' if asked == 'bf16' else 'AVX-512 FP16 or AMX-FP16'}, or pass "
                              f"{self.target.base}@allow_f32=1 to run it anyway (said in every result).")
        if self.ran_in != asked and (str(self.target), self.ran_in) not in _SAID:
            _SAID.add((str(self.target), self.ran_in))
            log.warning("%s: OpenVINO was asked for %s and runs %s on this CPU (%s): the results are %s's", self.label, asked,
                        self.ran_in, _cpu_capabilities(self.core), self.ran_in)

    @property
    def hint_note(self) -> str:
        """A sentence when OpenVINO did not run the precision asked for ('' when it did)."""
        self._compile(())
        asked = self.config["INFERENCE_PRECISION_HINT"]
        if self.ran_in == asked:
            return ""
        return (f"{self.target}: OpenVINO was asked for {asked} but runs {self.ran_in} on this CPU ({_cpu_capabilities(self.core)}); "
                f"these results are {self.ran_in}'s, not {asked}'s. emu:{self.target.precision} gives what {asked} would compute.")

    # -- the deployed graph ------------------------------------------------------------------------------------
    def layers(self) -> list[dict]:
        """Every executed layer of the uncaptured compiled model: name, type, the original operations it
        computes, its runtime precision (from ``get_runtime_model()``), in execution order."""
        if self._layers is None:
            runtime = self._compile(()).get_runtime_model()
            layers = []
            for op in runtime.get_ordered_ops():
                info = op.get_rt_info()

                def text(key: str, info=info) -> str:
                    return info[key].astype(str) if key in info else ""

                kind = text("layerType")
                if kind in ("Input", "Output", "Const", "Result", "Parameter"):
                    continue
                originals = [n for n in text("originalLayersNames").split(",") if n]
                layers.append({"name": op.get_friendly_name(), "type": kind, "originals": originals,
                               "precision": text("runtimePrecision"), "order": int(text("execOrder") or 0)})
            self._layers = sorted(layers, key=lambda layer: layer["order"])
        return self._layers

    def kernels(self) -> list[tuple[str, str, list[str], list[str]]]:
        """(layer, type, output tensors, ONNX nodes) of each executed layer: the ONNX nodes are the
        original operations that are nodes of the model (OpenVINO names them after the nodes; the
        operations its transformations add carry other names), and a layer writes the outputs of the
        last of them in the model's order."""
        out = []
        for layer in self.layers():
            nodes = sorted((n for n in dict.fromkeys(layer["originals"]) if n in self._nodes), key=self._order.__getitem__)
            outputs = list(self._nodes[nodes[-1]]) if nodes else []
            out.append((layer["name"], layer["type"], outputs, nodes))
        return out

    def precisions(self) -> dict[str, str]:
        """ONNX node -> the precision OpenVINO ran the layer computing it in."""
        found: dict[str, str] = {}
        for layer, (_, _, _, nodes) in zip(self.layers(), self.kernels()):
            for node in nodes:
                found.setdefault(node, layer["precision"])
        return found

    def precision_counts(self) -> dict[str, int]:
        """How many executed layers ran in each precision (Reorders and Converts included)."""
        return dict(Counter(layer["precision"] for layer in self.layers()).most_common())

    def deployed_graph(self, graph, feeds: Mapping[str, np.ndarray] | None = None):
        """The runtime model mapped onto ``graph`` (:func:`aligner.graph.deployed.map_deployed`), each
        kernel with the precision it ran in."""
        from dataclasses import replace

        from aligner.graph.deployed import map_deployed

        deployed = map_deployed(graph, self.kernels(), f"{self.target} (OpenVINO {self.ov.__version__.split('-')[0]}, runs {self.ran_in})")
        by_layer = {layer["name"]: layer["precision"] for layer in self.layers()}
        kernels = tuple(replace(k, precision=by_layer.get(k.name, "")) for k in deployed.kernels)
        return replace(deployed, kernels=kernels)

    @property
    def capturable(self) -> frozenset[str]:
        """``boundaries`` (default): tensors an executed layer writes; ``outputs``; ``all``: every tensor
        (making one inside a fused layer an output stops that fusion: the capture check says so)."""
        if self._capturable is None:
            if self.capture_policy == "boundaries":
                written = {t for _, _, outs, _ in self.kernels() for t in outs}
                self._capturable = self._every & (written | set(self.output_names) | set(self.input_names))
            elif self.capture_policy == "outputs":
                self._capturable = frozenset(self.output_names) | set(self.input_names)
            else:
                self._capturable = self._every
        return self._capturable

    # -- running -----------------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = check_capture(capture, self._every)
        wanted = [c for c in capture if c not in self.input_names] if capture else self.output_names
        shapes = [c for c in wanted if c in self._shape_path]
        if shapes and len(shapes) < len(wanted):  # never in one compiled model with the rest (see _shape_path)
            out = self.run(feeds, [c for c in capture if c not in self._shape_path])
            out.update(self.run(feeds, shapes))
            return {c: out[c] for c in capture}
        compiled = self._compile(tuple(sorted(capture)))
        try:
            results = compiled({k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self.input_names})
        except Exception as exc:  # noqa: BLE001
            raise TargetRunError(f"{self.label}: OpenVINO failed while running: {_short(exc)}") from None
        out, missing = {}, []
        for name in wanted:  # each by its own output port: after OpenVINO's transformations a port may carry several names
            try:
                out[name] = np.asarray(results[compiled.output(name)])
            except (RuntimeError, KeyError):
                missing.append(name)
        if missing:
            raise TargetRunError(f"{self.label}: OpenVINO returned no tensor named {missing[0]!r} ({len(missing)} missing)")
        out.update({c: feeds[c] for c in capture if c in self.input_names})
        return out

    @cached_property
    def _shape_path(self) -> frozenset[str]:
        """Integer tensors computed from shapes (ShapeOf, Gather of a shape, ...): making one an output keeps
        OpenVINO from folding the shape computation, and on a QDQ model that changed the values it returned
        for *other* captured tensors (the example detector on ov:cpu:int8: the first Conv's quantized output
        off by up to 176 of 255 when captured with /blocks.0/attn/Gather_1_output_0, exact alone; the graph
        outputs moved by rel_l2 0.036 only). So they are captured in a compiled model of their own."""
        from onnx import TensorProto, shape_inference

        try:
            inferred = shape_inference.infer_shapes(onnx.load(str(self._path), load_external_data=False))
        except Exception:  # noqa: BLE001 - no types: nothing is set apart
            return frozenset()
        floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
        typed = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        return frozenset(name for name, elem in typed.items() if elem and elem not in floats and elem not in (TensorProto.INT8,
                         TensorProto.UINT8) and name not in self.output_names)

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        """Milliseconds per synchronous inference of the uncaptured compiled model (one infer request)."""
        request = self._compile(()).create_infer_request()
        inputs = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self.input_names}
        try:
            return time_runs(lambda: request.infer(inputs), runs, warmup)
        except Exception as exc:  # noqa: BLE001
            raise TargetRunError(f"{self.label}: OpenVINO failed while timing: {_short(exc)}") from None

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return self._inputs


KEEP_FP32 = "disable_fp16_compression_0"  # OpenVINO's mark of an operation its precision conversion leaves in FP32


def keep_fp32(model, pins) -> int:
    """Mark the operations of ``pins`` (ONNX node names) to stay FP32 under a lower inference precision:
    OpenVINO names an operation after its ONNX node (or ``node/suffix`` where one node became
    several). Returns how many operations were marked."""
    pins, marked = set(pins), 0
    for op in model.get_ops():
        name = op.get_friendly_name()
        if name in pins or name.split("/WithoutBiases")[0] in pins:
            op.get_rt_info()[KEEP_FP32] = ""
            marked += 1
    return marked


def _cpu_capabilities(core) -> str:
    try:
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # noqa: BLE001
        return "capabilities unknown"
    return f"{name}; OPTIMIZATION_CAPABILITIES {', '.join(caps)}"


def _short(exc: Exception) -> str:
    """OpenVINO's message without its stack of "Exception from src/...cpp:N:" lines (the first line alone
    said nothing: the failing transformation and check come after them)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Exception from src/")]
    return (" ".join(lines) or type(exc).__name__)[:600]


__all__ = ["HINTS", "OV_OPTIONS", "OvRunner", "compile_config", "ov_options"]
