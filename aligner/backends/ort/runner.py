"""ONNX Runtime: the one place sessions are built (:func:`make_session`), and the runner.

:func:`make_session` turns a target into providers, provider options and session options: the
target's runtime options (``ort:cuda:fp16@cudnn_conv_algo_search=HEURISTIC``) are CUDA provider
options (:data:`CUDA_OPTIONS`) or session options (:data:`SESSION_OPTIONS`); an explicit option
wins over the precision's default (``use_tf32`` follows tf32/fp32 unless given). The runner, bench
and build's ``--ort-optimized`` all build their sessions through it.

:class:`OrtRunner` captures any top-level tensor by adding it to the graph outputs. Models are kept
as a small skeleton (graph without weight data) plus one external weight file in a private temp
directory when they are large, so each capture group costs a few KB of protobuf and models over
2 GiB work; the session reads the weights from disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from aligner.backends.base import InputInfo, capture_policy, check_capture, check_options, choice_option, describe_model_inputs, int_option, time_runs
from aligner.backends.ort.sandbox import sandboxed
from aligner.backends.target import Target
from aligner.errors import TargetError, TargetRunError
from aligner.plugin import has_plugins

EXTERNALIZE_ABOVE = 64 * 2**20  # bytes of weights above which they move to an external file
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# Session options by documented name (ort:* and, except the optimization level, emu:*).
SESSION_OPTIONS = {
    "graph_optimization_level": "disable_all|basic|extended|all; default all for targets, disable_all for the reference",
    "intra_op_num_threads": "threads inside one op (0: ONNX Runtime's default)",
    "inter_op_num_threads": "threads across ops when execution_mode=parallel (0: default)",
    "execution_mode": "sequential|parallel",
    "sandbox": "1|0; 1 (default for ort targets): run in a child process, so a crash of ONNX Runtime is reported as a target failure",
}
# Threads inside one op when the target does not say (intra_op_num_threads): set by aligner's trial
# workers to their share of the cores, so N workers do not each start a pool the size of the machine.
THREADS_ENV = "ALIGNER_ORT_THREADS"
# CUDA execution provider options (ort:cuda:*), passed to ONNX Runtime as given.
CUDA_OPTIONS = {
    "cudnn_conv_algo_search": "EXHAUSTIVE|HEURISTIC|DEFAULT",
    "use_tf32": "0|1; default 1 for tf32 targets, else 0",
    "prefer_nhwc": "0|1",
    "cudnn_conv_use_max_workspace": "0|1",
    "cudnn_conv1d_pad_to_nc1d": "0|1",
    "enable_cuda_graph": "0|1 (static shapes)",
    "do_copy_in_default_stream": "0|1",
    "device_id": "GPU index",
    "gpu_mem_limit": "bytes",
    "arena_extend_strategy": "kNextPowerOfTwo|kSameAsRequested",
    "tunable_op_enable": "0|1",
    "tunable_op_tuning_enable": "0|1",
    "tunable_op_max_tuning_duration_ms": "milliseconds",
    "enable_skip_layer_norm_strict_mode": "0|1",
    "fuse_conv_bias": "0|1",
    "use_ep_level_unified_stream": "0|1",
    "sdpa_kernel": "attention kernel bit mask",
}
_LEVELS = {"disable_all": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def known_options(target: Target) -> dict[str, str]:
    """The runtime options ``target`` takes: the emulator's graph must run as written (no optimizer)."""
    known = {k: v for k, v in SESSION_OPTIONS.items() if not (target.runtime == "emu" and k == "graph_optimization_level")}
    if target.runtime == "emu":
        known["fusions"] = ("ort: emulate the kernels ONNX Runtime fuses (each computes inside in FP32 and stores only its "
                            "outputs in the low precision, as GPU kernels do); capturing inside one unfuses it, as on the runtime")
    return known | (CUDA_OPTIONS if target.device == "cuda" else {})


def check_ort_options(target: Target) -> dict[str, str]:
    """``target``'s options, each one it takes (a CUDA option on a CPU target says so)."""
    elsewhere = {k: "a CUDA provider option: it applies to ort:cuda:* targets" for k in CUDA_OPTIONS}
    if target.runtime == "emu":
        elsewhere["graph_optimization_level"] = "not for the emulator, whose graph runs as written (optimizations would fold its roundings)"
    return check_options(target, known_options(target), elsewhere)


def providers_for(target: Target) -> list:
    """ONNX Runtime providers for ``target`` with their options; a clear error when this install lacks one."""
    provider = _PROVIDERS[target.device]
    if provider not in ort.get_available_providers():
        raise TargetError(
            f"Target {target} needs ONNX Runtime's {provider}, which this install lacks "
            f"(available: {ort.get_available_providers()}). Install it with: pip install 'aligner[gpu]'"
        )
    if provider == "CPUExecutionProvider":
        return [provider]
    return [(provider, cuda_provider_options(target)), "CPUExecutionProvider"]


def cuda_provider_options(target: Target) -> dict[str, str]:
    """The CUDA provider options of ``target``: TF32 explicit (on for tf32 only), then the target's
    own CUDA options, which win."""
    options = {"use_tf32": "1" if target.precision == "tf32" else "0"}
    options.update({k: v for k, v in target.options if k in CUDA_OPTIONS})
    return options


def session_options(target: Target, optimize: bool) -> ort.SessionOptions:
    """Session options of ``target``: ``optimize`` False is the reference's fidelity (no graph optimizer)."""
    options = check_ort_options(target)
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns on every capture model; errors still raise
    level = "all" if optimize else "disable_all"
    if "graph_optimization_level" in options:
        level = choice_option(target, "graph_optimization_level", options["graph_optimization_level"], _LEVELS)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        if key in options:
            setattr(so, key, int_option(target, key, options[key]))
    if "intra_op_num_threads" not in options and os.environ.get(THREADS_ENV, "").isdigit():
        so.intra_op_num_threads = int(os.environ[THREADS_ENV])  # a trial worker's share of the cores (aligner.search.executor)
    if "execution_mode" in options:
        mode = choice_option(target, "execution_mode", options["execution_mode"], ("sequential", "parallel"))
        so.execution_mode = getattr(ort.ExecutionMode, f"ORT_{mode.upper()}")
    return so


def make_session(model: onnx.ModelProto | str | Path, target: Target, optimize: bool = True, custom_ops: str | None = None,
                 memory_arena: bool = True, optimized_model_path: str | Path | None = None, label: str = "") -> ort.InferenceSession:
    """The ONNX Runtime session of ``model`` (a ModelProto or a path) on ``target``: providers and
    their options, session options, plugin custom ops (``custom_ops``: the library to register;
    a ModelProto with aligner plugin nodes gets them adapted and registered here), and
    ``optimized_model_path`` to have ONNX Runtime write the graph it optimized."""
    ort.set_default_logger_severity(3)
    so = session_options(target, optimize)
    so.enable_cpu_mem_arena = memory_arena
    if not memory_arena:  # a capture session, run once or twice: threads that spin between ops only burn the cores (DETR-R50: 12% of compare's CPU)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto) and has_plugins(model):
        from aligner.plugin.ort import adapt_for_ort, register_ort_ops

        custom_ops, model = register_ort_ops(), adapt_for_ort(model)
    if custom_ops:
        so.register_custom_ops_library(custom_ops)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    providers = providers_for(target)
    try:
        session = ort.InferenceSession(source, so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise TargetRunError(f"{label or target}: ONNX Runtime could not build the model: {_short(exc)}") from None
    wanted = _PROVIDERS[target.device]
    if wanted not in session.get_providers():  # ORT retries on the CPU when a provider fails to start: not silently here
        raise TargetRunError(f"{label or target}: ONNX Runtime could not start its {wanted} with the options {providers[0][1]} "
                             "(see its 'EP Error' above: a provider option it cannot take?) and fell back to the CPU.")
    return session


class OrtRunner:
    """Run ``model`` on ONNX Runtime; ``optimize`` False disables graph optimizations (reference)."""

    def __init__(self, model: onnx.ModelProto, target: Target, optimize: bool, label: str = ""):
        self.target, self.optimize, self.label = target, optimize, label or str(target)
        session_options(target, optimize)  # unknown or bad runtime options fail here, not at the first run
        providers_for(target)
        self._dir = Path(tempfile.mkdtemp(prefix="aligner-ort-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._custom_ops = None
        if has_plugins(model):  # aligner plugin nodes run as their reference custom ops
            from aligner.plugin.ort import adapt_for_ort, register_ort_ops

            self._custom_ops = register_ort_ops()
            model = adapt_for_ort(model)
        self._source, self._skeleton = model, None  # externalized on first use: a runner that is never run writes nothing
        initializers = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]
        produced = {o for n in model.graph.node for o in n.output if o}
        self._every = frozenset(produced | set(self.input_names))
        self._capturable: frozenset[str] | None = None
        self.fuses = optimize  # ONNX Runtime's optimizer may fuse: captures are checked against an uncaptured run
        self.capture_policy = capture_policy(target) if optimize else "all"
        self._bf16 = _bf16_tensors(self._model) if target.precision == "bf16" else frozenset()
        self._session_key: tuple[str, ...] | None = None
        self._session: ort.InferenceSession | None = None
        self._files: dict[tuple[str, ...], Path] = {}
        self._written = 0
        # Optimized targets run in a child process unless told not to (plugin ops report their errors in-process).
        self._sandboxed = optimize and not self._custom_ops and sandboxed(target)

    @property
    def _model(self) -> onnx.ModelProto:
        """The model as sessions read it: large weights moved to one file in the runner's directory."""
        if self._skeleton is None:
            self._skeleton, self._source = _externalize(self._source, self._dir), None
        return self._skeleton

    @property
    def capturable(self) -> frozenset[str]:
        """What this runner captures under its policy: ``boundaries`` — only the tensors of the graph
        ONNX Runtime deploys (capturing one inside a fused kernel would stop the fusion)."""
        if self._capturable is None:
            if self.capture_policy == "boundaries":
                deployed = self.optimized_model()
                kept = {o for n in deployed.graph.node for o in n.output if o} | {o.name for o in deployed.graph.output}
                self._capturable = self._every & (kept | set(self.input_names))
            elif self.capture_policy == "outputs":
                self._capturable = frozenset(self.output_names) | set(self.input_names)
            else:
                self._capturable = self._every
        return self._capturable

    def _model_file(self, capture: tuple[str, ...]) -> Path:
        """The model capturing ``capture``, written once per capture set (the last few kept)."""
        if capture in self._files:
            return self._files[capture]
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        if capture:  # only the captured tensors are outputs, so ORT skips nodes no capture needs
            del model.graph.output[:]
            for name in capture:
                if name in self._bf16:  # numpy has no bfloat16: ORT can only hand it back as FP32
                    model.graph.node.append(helper.make_node("Cast", [name], [name + _AS_FP32], to=onnx.TensorProto.FLOAT))
                    model.graph.output.append(helper.make_empty_tensor_value_info(name + _AS_FP32))
                elif name not in self.input_names:
                    model.graph.output.append(helper.make_empty_tensor_value_info(name))
        path = self._dir / f"capture-{self._written}.onnx"
        self._written += 1
        onnx.save(model, str(path))
        if len(self._files) >= 4:  # keep the directory small: drop the oldest capture model
            old = next(iter(self._files))
            self._files.pop(old).unlink(missing_ok=True)
        self._files[capture] = path
        return path

    def _session_for(self, capture: tuple[str, ...]) -> ort.InferenceSession:
        if self._session is not None and self._session_key == capture:
            return self._session
        self._session = None  # free the previous session before building the next
        path = self._model_file(capture)
        # a capture session hands its buffers back to the OS between groups; the plain one runs as deployed
        self._session = make_session(path, self.target, self.optimize, self._custom_ops, memory_arena=not capture, label=self.label)
        self._session_key = capture
        return self._session

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = check_capture(capture, self._every)
        wanted = [c for c in capture if c not in self.input_names] if capture else self.output_names
        if capture and not wanted:  # only graph inputs asked for: they are the feeds (ONNX Runtime refuses a run that fetches nothing)
            return {c: feeds[c] for c in capture}
        fetch = [c + _AS_FP32 if c in self._bf16 else c for c in wanted]
        if self._sandboxed:
            from aligner.backends.ort.sandbox import sandbox

            values = sandbox().run(self._model_file(capture), self.target, self.optimize, not capture, fetch, dict(feeds), self.label)
        else:
            session = self._session_for(capture)
            try:
                values = session.run(fetch, feeds)
            except Exception as exc:  # noqa: BLE001
                raise TargetRunError(f"{self.label}: ONNX Runtime failed while running: {_short(exc)}") from None
        self._raise_plugin_errors()
        out = dict(zip(wanted, values))
        out.update({c: feeds[c] for c in capture if c in self.input_names})
        return out

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        """Milliseconds per run of the uncaptured model (:func:`time_session`), in the sandbox's child
        when the runner runs there: a runtime that crashes while timing is a TargetRunError, as in run."""
        if self._sandboxed:
            from aligner.backends.ort.sandbox import sandbox

            return sandbox().time(self._model_file(()), self.target, dict(feeds), runs, warmup, self.label)
        return time_session(self._session_for(()), self.target, feeds, runs, warmup, self.label, self._raise_plugin_errors)

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return describe_model_inputs(self._model)

    def optimized_model(self) -> onnx.ModelProto:
        """The graph ONNX Runtime deploys for this runner (its optimizer's output for the target's
        provider and level), read from the file it writes; in the sandbox when the runner uses it."""
        out = self._dir / "deployed.onnx"
        if not out.exists():
            if self._sandboxed:
                from aligner.backends.ort.sandbox import sandbox

                sandbox().run(self._model_file(()), self.target, True, True, [], {}, self.label, optimized=out)
            else:
                make_session(self._model_file(()), self.target, True, self._custom_ops, optimized_model_path=out, label=self.label)
        return onnx.load(str(out), load_external_data=False)

    def _raise_plugin_errors(self) -> None:
        if self._custom_ops:
            from aligner.plugin.ort import take_errors

            if errors := take_errors():
                raise TargetRunError(f"{self.label}: a plugin op failed: {'; '.join(errors[:3])}")


def save_optimized(model_path: str | Path, target: Target, out: str | Path) -> None:
    """Write ONNX Runtime's optimized graph of ``model_path`` for ``target`` (its provider and options)."""
    make_session(model_path, target, optimize=True, optimized_model_path=out)


_AS_FP32 = "__aligner_as_fp32"


def _bf16_tensors(model: onnx.ModelProto) -> frozenset[str]:
    """Tensors stored as bfloat16 (shape inference on the weightless skeleton)."""
    from aligner.graph.model import infer_shapes

    inferred = infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    return frozenset(v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16)


def _short(exc: Exception) -> str:
    text = str(exc).strip().replace("\n", " ")
    return text if len(text) < 600 else text[:600] + " ..."


def _externalize(model: onnx.ModelProto, directory: Path) -> onnx.ModelProto:
    """Small models stay in memory; large ones become a skeleton pointing at weights.bin."""
    model = ort_readable(model)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes < EXTERNALIZE_ABOVE:
        return model
    from onnx.external_data_helper import convert_model_to_external_data

    work = onnx.ModelProto()
    work.CopyFrom(model)
    convert_model_to_external_data(work, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save(work, str(directory / "model.onnx"))  # writes weights.bin, leaves references in `work`
    return onnx.load(str(directory / "model.onnx"), load_external_data=False)


def ort_readable(model: onnx.ModelProto, version: int = 10) -> onnx.ModelProto:
    """``model``, or a copy with its IR version stamp lowered to ``version`` when a newer onnx wrote
    one ONNX Runtime does not read yet (the graph itself is unchanged)."""
    if model.ir_version <= version:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = version
    return copy


def time_session(session: ort.InferenceSession, target: Target, feeds: dict[str, np.ndarray], runs: int, warmup: int,
                 label: str = "", after_first=lambda: None) -> list[float]:
    """Milliseconds per run of ``session``; on CUDA the inputs and outputs are bound on the GPU
    (I/O binding) and the outputs synchronised before the clock is read."""
    label = label or str(target)
    if target.device == "cuda":
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def once():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        names = [o.name for o in session.get_outputs()]

        def once():
            session.run(names, feeds)
    try:
        return time_runs(once, runs, warmup, after_first=after_first)
    except TargetRunError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TargetRunError(f"{label}: ONNX Runtime failed while timing: {_short(exc)}") from None


__all__ = ["CUDA_OPTIONS", "OrtRunner", "SESSION_OPTIONS", "check_ort_options", "cuda_provider_options", "known_options", "make_session", "ort_readable", "providers_for", "save_optimized",
           "session_options", "time_session"]
