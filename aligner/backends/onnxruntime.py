"""ONNX Runtime runner: captures any top-level tensor by adding it to the graph outputs.

Models are kept as a small skeleton (graph without weight data) plus one external weight file in a
private temp directory when they are large, so each capture group costs a few KB of protobuf and
models over 2 GiB work; the session reads the weights from disk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from aligner.backends.target import Target
from aligner.errors import InputError, TargetError, TargetRunError, unknown_name_message
from aligner.plugin import has_plugins
from aligner.plugin.ort import adapt_for_ort, register_ort_ops, take_errors

log = logging.getLogger(__name__)

EXTERNALIZE_ABOVE = 64 * 2**20  # bytes of weights above which they move to an external file
ort.set_default_logger_severity(3)  # ORT warns on every capture model; errors still raise
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def providers_for(target: Target, cpu_fallback: bool = True) -> list:
    """ONNX Runtime providers for ``target``, TF32 made explicit on CUDA (ORT would otherwise pick
    its own default); a clear error when this install lacks the provider."""
    provider = _PROVIDERS[target.device]
    if provider not in ort.get_available_providers():
        raise TargetError(
            f"Target {target} needs ONNX Runtime's {provider}, which this install lacks "
            f"(available: {ort.get_available_providers()}). Install it with: pip install 'aligner[gpu]'"
        )
    if provider == "CPUExecutionProvider":
        return [provider]
    cuda = (provider, {"use_tf32": "1" if target.precision == "tf32" else "0"})
    return [cuda, "CPUExecutionProvider"] if cpu_fallback else [cuda]


class OrtRunner:
    """Run ``model`` on ONNX Runtime; ``optimize`` False disables graph optimizations (reference)."""

    def __init__(self, model: onnx.ModelProto, target: Target, optimize: bool, label: str = ""):
        self.target, self.optimize, self.label = target, optimize, label or str(target)
        self._providers = providers_for(target)
        self._dir = Path(tempfile.mkdtemp(prefix="aligner-ort-"))
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._custom_ops = None
        if has_plugins(model):  # aligner plugin nodes run as their reference custom ops
            self._custom_ops = register_ort_ops()
            model = adapt_for_ort(model)
        self._model = _externalize(model, self._dir)
        self.input_names = [i.name for i in self._model.graph.input if i.name not in {t.name for t in self._model.graph.initializer}]
        self.output_names = [o.name for o in self._model.graph.output]
        produced = {o for n in self._model.graph.node for o in n.output if o}
        self.capturable = frozenset(produced | set(self.input_names))
        self._bf16 = _bf16_tensors(self._model) if target.precision == "bf16" else frozenset()
        self._session_key: tuple[str, ...] | None = None
        self._session: ort.InferenceSession | None = None

    def _session_for(self, capture: tuple[str, ...]) -> ort.InferenceSession:
        if self._session is not None and self._session_key == capture:
            return self._session
        self._session = None  # free the previous session before building the next
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
        path = self._dir / "capture.onnx"
        onnx.save(model, str(path))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = False  # return capture buffers to the OS between groups
        if self._custom_ops:
            options.register_custom_ops_library(self._custom_ops)
        if not self.optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=self._providers)
        except Exception as exc:  # ORT raises its own exception types
            raise TargetRunError(f"{self.label}: ONNX Runtime could not build the model: {_short(exc)}") from None
        self._session_key = capture
        return self._session

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = tuple(dict.fromkeys(capture))
        for name in capture:
            if name not in self.capturable:
                raise InputError(unknown_name_message("tensor", name, self.capturable))
        session = self._session_for(capture)
        wanted = [c for c in capture if c not in self.input_names] if capture else self.output_names
        fetch = [c + _AS_FP32 if c in self._bf16 else c for c in wanted]
        try:
            values = session.run(fetch, feeds)
        except Exception as exc:
            raise TargetRunError(f"{self.label}: ONNX Runtime failed while running: {_short(exc)}") from None
        if self._custom_ops and (errors := take_errors()):
            raise TargetRunError(f"{self.label}: a plugin op failed: {'; '.join(errors[:3])}")
        out = dict(zip(wanted, values))
        out.update({c: feeds[c] for c in capture if c in self.input_names})
        return out


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
    if model.ir_version > 10:
        model = _with_ir_version(model, 10)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes < EXTERNALIZE_ABOVE:
        return model
    from onnx.external_data_helper import convert_model_to_external_data

    work = onnx.ModelProto()
    work.CopyFrom(model)
    convert_model_to_external_data(work, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save(work, str(directory / "model.onnx"))  # writes weights.bin, leaves references in `work`
    return onnx.load(str(directory / "model.onnx"), load_external_data=False)


def _with_ir_version(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Lower the IR version stamp when a newer onnx wrote a version ORT does not read yet."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = version
    return copy
