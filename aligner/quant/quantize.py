"""The QDQ model of an INT8 target, made by ONNX Runtime's quantizer and cached.

:func:`quantize` calls ``onnxruntime.quantization.quantize_static`` (QDQ format) with the target's
settings (:class:`QuantSettings`, from its runtime options) and its pins as ``nodes_to_exclude``
(kept in float). Calibration runs once per (model, calibration data, method), sample by sample
(:mod:`aligner.quant.ranges`: memory flat in the number of samples; the sweep's methods share one
pass): its ranges go to the calibration cache file ``quantize_static`` reads
(``calibration_cache_path``), which every later quantization of the same model reuses, so a
pin-search trial costs one quantization (no calibration) and one run. Quantized models are cached
per (model, settings, calibration, excluded nodes) in one private temp directory, removed at exit.

Per-channel Q/DQ needs opset 13 (``DequantizeLinear``'s ``axis``): a model below it is upgraded with
``onnx.version_converter`` (node and tensor names kept), else quantized per-tensor; either way
:attr:`QuantizedModel.opset_note` says which.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from aligner.backends.registry import backend_of
from aligner.backends.target import Target
from aligner.errors import InputError, TargetRunError
from aligner.graph.fingerprint import model_digest
from aligner.graph.model import ModelGraph
from aligner.quant.calib import Calibration, load_calibration
from aligner.quant.settings import (CALIBRATE, FALLBACK, QUANT_OPTIONS, TYPES, QuantSettings,  # noqa: F401 - the settings
                                    engine_target, session_target, vnni_missing)  # it quantizes by, re-exported

log = logging.getLogger(__name__)

KEEP_MODELS = 8  # quantized models kept on disk (the oldest is removed first)
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel scales) appeared in opset 13
CALIB_BUDGET_MB = 1024  # one sample's calibrated tensors captured per session at most (larger: in groups)


@dataclass(frozen=True)
class QuantizedModel:
    """A QDQ model made by ONNX Runtime's quantizer, and how it was made."""

    model: onnx.ModelProto
    settings: QuantSettings
    excluded: tuple[str, ...]
    calibration: Calibration
    opset_note: str = ""  # a model below opset 13: upgraded, or quantized per-tensor (and why)

    def to_dict(self) -> dict:
        return {"quantizer": "onnxruntime.quantization.quantize_static (QDQ)", "settings": self.settings.to_dict(),
                "excluded": list(self.excluded), "calibration": self.calibration.to_dict(),
                **({"opset": self.opset_note} if self.opset_note else {})}


class _Cache:
    """One private temp directory for calibration ranges and quantized models, removed at exit."""

    def __init__(self):
        self._dir: Path | None = None
        self.calibrations: dict[tuple, Calibration] = {}
        self.models: dict[tuple, Path] = {}
        self.opsets: dict[str, tuple[Path, str, bool]] = {}  # model sha -> (float model file to quantize, opset note, per-channel possible)

    @property
    def dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="aligner-int8-"))
            atexit.register(shutil.rmtree, self._dir, True)
        return self._dir

    def path(self, kind: str, key: tuple) -> Path:
        return self.dir / f"{kind}-{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}"


_CACHE = _Cache()


def model_sha(graph: ModelGraph) -> str:
    """The model's content hash (the one plans record; streamed, so no 2 GiB protobuf limit)."""
    return model_digest(graph.model)


def calibration_of(graph: ModelGraph, target: Target) -> Calibration:
    """The target's calibration data (its ``calib`` option), loaded once per model and source."""
    source = target.option_dict.get("calib")
    key = (model_sha(graph), source)
    if key not in _CACHE.calibrations:
        _CACHE.calibrations[key] = load_calibration(graph, source)
    return _CACHE.calibrations[key]


def quantize(graph: ModelGraph, target: Target, exclude: Iterable[str] | None = None) -> QuantizedModel:
    """The QDQ model of ``graph`` for INT8 ``target``: ONNX Runtime's ``quantize_static`` with the
    target's settings, calibration and pins (or ``exclude``) kept in float. Cached."""
    from aligner.graph.precision import check_nodes
    from aligner.quant.runner import prequantized

    if prequantized(graph.model):
        raise InputError(f"{graph.path or 'The model'} is quantized already (Q/DQ nodes, or an aligner INT8 build): aligner quantizes "
                         f"float models. Give the float model with --target {target.base} --calib ..., or run this one as it is "
                         "(aligner bench / eval MODEL).")
    settings = QuantSettings.of(target)
    excluded = tuple(sorted(check_nodes(graph, target.pins if exclude is None else exclude)))
    calibration = calibration_of(graph, target)
    sha = model_sha(graph)
    source, note, per_channel_ok = quantizable_model(graph)
    quantizer_settings = settings if per_channel_ok else replace(settings, per_channel=False)
    emulate = settings.fallback != "fp32" and backend_of(target).int8_emulated  # the fallback's rounding emulated, as emu:fp16 does
    key = (sha, settings, calibration.key, excluded, emulate)
    path = _CACHE.models.get(key)
    if path is None:
        path = _CACHE.path("model", key).with_suffix(".onnx")
        ranges = calibrate_ranges(graph, target, (settings.calibrate,))[settings.calibrate]
        _quantize_static(source, quantizer_settings, excluded, ranges, path)
        if settings.fallback != "fp32":
            onnx.save(low_precision_fallback(onnx.load(str(path)), settings.fallback, emulate), str(path))
        _CACHE.models[key] = path
        while len(_CACHE.models) > KEEP_MODELS:  # a pin search quantizes once per trial: keep the disk use bounded
            _CACHE.models.pop(next(iter(_CACHE.models))).unlink(missing_ok=True)
    return QuantizedModel(onnx.load(str(path)), settings, excluded, calibration, note)


def quantizable_model(graph: ModelGraph) -> tuple[Path, str, bool]:
    """The float model file ONNX Runtime's quantizer reads for ``graph`` (an IR version it reads; below
    opset 13 upgraded to 13 where ``onnx.version_converter`` keeps every node and tensor name), what was
    done about the opset (empty: nothing), and whether per-channel Q/DQ is possible. Cached per model."""
    sha = model_sha(graph)
    if sha not in _CACHE.opsets:
        from aligner.backends.ort.runner import ort_readable

        model, note, per_channel = graph.model, "", True
        opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
        if opset < PER_CHANNEL_OPSET:
            model, why = _upgraded(graph, PER_CHANNEL_OPSET)
            if model is not None:
                note = (f"opset {opset} < {PER_CHANNEL_OPSET} (per-channel Q/DQ needs {PER_CHANNEL_OPSET}): upgraded to opset "
                        f"{PER_CHANNEL_OPSET} with onnx.version_converter before quantizing")
            else:
                model, per_channel = graph.model, False
                note = (f"opset {opset} < {PER_CHANNEL_OPSET} (per-channel Q/DQ needs {PER_CHANNEL_OPSET}) and the upgrade failed "
                        f"({why}): quantized per-tensor (one scale per weight); upgrade the model to opset {PER_CHANNEL_OPSET}+ "
                        "for per-channel scales")
            log.warning("INT8: %s.", note)
        path = _CACHE.path("float", (sha,)).with_suffix(".onnx")
        onnx.save(ort_readable(model), str(path), save_as_external_data=model.ByteSize() > 2**31 - 2**24)
        _CACHE.opsets[sha] = (path, note, per_channel)
    return _CACHE.opsets[sha]


def _upgraded(graph: ModelGraph, opset: int) -> tuple[onnx.ModelProto | None, str]:
    """``graph``'s model at ``opset`` by onnx's version converter, or (None, why not): the converter
    failed, the result fails the checker, or it lost a node or tensor name (plans and Q/DQ matching
    speak in the original names)."""
    from onnx import version_converter

    try:
        model = version_converter.convert_version(graph.model, opset)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"
    nodes = {n.name for n in model.graph.node}
    tensors = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    lost = [n.name for n in graph.nodes if n.name not in nodes] + [t for t in graph.activations() if t not in tensors]
    if lost:
        return None, f"the converted model lost {len(lost)} name(s), e.g. {lost[0]!r}"
    return model, ""


def calibrate_ranges(graph: ModelGraph, target: Target, methods: Iterable[str]) -> dict[str, Path]:
    """The calibration cache file of each method in ``methods`` for ``target``'s calibration data,
    computed where missing in one streaming pass shared by the missing methods (entropy and
    percentile share their histogram pass; minmax comes with them free). Cached per model and data."""
    from aligner.quant.ranges import HISTOGRAM_METHODS, calibrate, save_ranges

    settings = QuantSettings.of(target)
    calibration = calibration_of(graph, target)
    sha = model_sha(graph)
    paths = {m: _CACHE.path("ranges", (sha, calibration.key, m, settings.percentile if m == "percentile" else None)).with_suffix(".json")
             for m in (*methods, *HISTOGRAM_METHODS, "minmax")}
    missing = [m for m in dict.fromkeys(methods) if not paths[m].exists()]
    if missing:
        if any(m in HISTOGRAM_METHODS for m in missing):  # the histogram pass serves the others at no extra pass
            missing = [m for m in paths if not paths[m].exists()]
        source, _, _ = quantizable_model(graph)
        try:
            computed = calibrate(source, calibration.samples, missing, settings.percentile, CALIB_BUDGET_MB)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises many types
            raise TargetRunError(f"Calibrating {graph.path or 'the model'} on {calibration.source} failed ({', '.join(missing)}): "
                                 f"{type(exc).__name__}: {str(exc)[:400]}") from None
        for method, data in computed.items():
            save_ranges(data, paths[method])
    return {m: paths[m] for m in methods}


@dataclass(frozen=True)
class CalibrationState:
    """What another process needs to quantize ``graph`` for a target as this one does, without reading
    the calibration data or calibrating again: the data's key and size, and the computed ranges (the
    calibration cache files' bytes). A trial job carries it to its worker processes or Ray actors
    (:class:`aligner.search.int8.QuantizedTrialJob`): the data need not exist where they run."""

    sha: str
    source: str | None  # the target's calib option, as calibration_of keys it
    described: str  # Calibration.source
    key: str
    count: int
    ranges: tuple[tuple[str, bytes], ...]  # cache file name -> its bytes

    def install(self) -> None:
        """Put it into this process's cache (nothing where it is there already)."""
        if (self.sha, self.source) not in _CACHE.calibrations:
            _CACHE.calibrations[(self.sha, self.source)] = Calibration(_Elsewhere(self.count, self.described), self.described, self.key)
        for name, blob in self.ranges:
            path = _CACHE.dir / name
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(blob)
                tmp.replace(path)


class _Elsewhere(Sequence):
    """The calibration samples of a state installed from another process: counted, not readable here."""

    def __init__(self, count: int, source: str):
        self.count, self.source = count, source

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        raise InputError(f"the calibration samples ({self.source}) are read in the process that started the search; "
                         "this one has only their computed ranges")


def calibration_state(graph: ModelGraph, target: Target) -> CalibrationState:
    """``target``'s calibration of ``graph`` as :class:`CalibrationState` (its ranges as computed so far:
    call :func:`calibrate_ranges` first for every method the other process will quantize with)."""
    calibration = calibration_of(graph, target)
    prefix = "ranges-"
    ranges = tuple((p.name, p.read_bytes()) for p in sorted(_CACHE.dir.glob(prefix + "*.json")))
    return CalibrationState(model_sha(graph), target.option_dict.get("calib"), calibration.source, calibration.key,
                            len(calibration.samples), ranges)


def _quantize_static(source: Path, settings: QuantSettings, excluded: tuple[str, ...], ranges: Path, out: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibrate]
    extra = {"CalibPercentile": settings.percentile} if settings.calibrate == "percentile" else {}
    if settings.symmetric:
        extra["ActivationSymmetric"] = True
    if not settings.quantize_bias:
        extra["QuantizeBias"] = False
    try:
        with _quiet_root_logger():
            quantize_static(str(source), str(out), None, quant_format=QuantFormat.QDQ,  # ranges from the cache file: no calibration here
                            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                            activation_type=qtype[settings.types[:2]], weight_type=qtype[settings.types[2:]],
                            nodes_to_exclude=list(excluded), calibrate_method=method, extra_options=extra,
                            calibration_cache_path=str(ranges))
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
        raise TargetRunError(f"ONNX Runtime's quantizer could not quantize the model ({settings.describe()}, "
                             f"{len(excluded)} node(s) kept in float): {type(exc).__name__}: {str(exc)[:400]}") from None


def low_precision_fallback(qdq: onnx.ModelProto, precision: str, emulate: bool = False) -> onnx.ModelProto:
    """Mixed INT8 + FP16: aligner's precision rewrite of the QDQ model with every Q/DQ and every node
    whose output is quantized (the quantizer's DQ -> op -> Q units, which the runtime fuses into
    integer kernels) kept as they are, everything else in ``precision`` (explicit Casts at the edges).
    A float node that reads a dequantized tensor and writes an unquantized one runs in ``precision``.
    ``emulate``: the FP16 emulator's model instead (every such node's output rounded to ``precision``
    on a runtime that computes in FP32, so overflows show on the CPU as on the GPU)."""
    from aligner.graph.precision import rewrite_precision

    nodes = qdq.graph.node
    for i, node in enumerate(nodes):  # the rewrite pins by name
        node.name = node.name or f"_unnamed_{i}_{node.op_type}"
    quantized = {n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    keep = [n.name for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear") or any(o in quantized for o in n.output)]
    if emulate:
        from aligner.backends.emu.emulate import emulate_model

        return emulate_model(ModelGraph(qdq), keep, precision).model
    rewrite = rewrite_precision(ModelGraph(qdq), keep, precision)
    for o in rewrite.overflows:
        log.warning("fallback=%s: weight %s has %d value(s) up to %.3g, beyond %s's range (they become inf)", precision, o.tensor,
                    o.count, o.max_abs, precision)
    return rewrite.model


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantizer logs advice through the root logger on every call and its histogram
    calibrators print progress: library code stays quiet (what they say goes to our debug log)."""
    import io
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's divide-by-zero on constant tensors, not the user's concern
            yield
    finally:
        root.setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", printed.getvalue().strip())


def save_quantized(graph: ModelGraph, target: Target, out: str | Path) -> QuantizedModel:
    """Write the QDQ model of ``target`` (its pins kept in float) to ``out``."""
    from aligner.inputs import write_atomic

    quantized = quantize(graph, target)
    write_atomic(Path(out), quantized.model.SerializeToString())
    return quantized


__all__ = ["CALIBRATE", "CalibrationState", "calibration_state", "FALLBACK", "PER_CHANNEL_OPSET", "QUANT_OPTIONS", "QuantSettings", "QuantizedModel", "TYPES", "calibrate_ranges",
           "calibration_of", "engine_target", "low_precision_fallback", "quantizable_model", "quantize", "save_quantized", "session_target"]
