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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx

from aligner.backends.base import choice_option
from aligner.backends.registry import backend_of
from aligner.backends.target import Target
from aligner.errors import InputError, TargetError, TargetRunError
from aligner.graph.fingerprint import model_digest
from aligner.graph.model import ModelGraph
from aligner.quant.calib import Calibration, load_calibration

log = logging.getLogger(__name__)

# Runtime options of ort:cpu:int8 / emu:int8 (besides ONNX Runtime's session options), by documented name.
QUANT_OPTIONS = {
    "calib": "calibration inputs: an .npz or a folder of .npz files (the CLI's --calib); without it the command's inputs, with a warning",
    "calibrate": "minmax|entropy|percentile: ONNX Runtime's calibration method (default minmax)",
    "percentile": "percentile of calibrate=percentile (default 99.999)",
    "types": "u8s8|s8s8|u8u8: activation then weight integer types (default u8s8, the fast one on x86 CPUs)",
    "reduce_range": "0|1: 7-bit weights (default 0; 1 on ort:cpu with u8s8/s8s8 where this CPU has no VNNI: ONNX Runtime's "
                    "integer kernels accumulate pairs in int16 there and saturate, as its documentation warns)",
    "per_channel": "1|0: per-output-channel weight scales (default 1)",
    "symmetric": "0|1: symmetric activation ranges, zero point 0 (default 0; trt:int8 always, the only INT8 TensorRT takes)",
    "quantize_bias": "1|0: biases as int32 DQ (default 1; trt:int8 always 0: TensorRT takes no int32 dequantization and adds biases in float)",
    "fallback": "fp32|fp16: the precision of what is not quantized, plan nodes included (default fp32; fp16 where the runtime "
                "runs FP16: ort:cuda, trt; the Q/DQ and the quantized nodes between them stay as quantized)",
}
FALLBACK = ("fp32", "fp16")
CALIBRATE = ("minmax", "entropy", "percentile")
KEEP_MODELS = 8  # quantized models kept on disk (the oldest is removed first)
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel scales) appeared in opset 13
CALIB_BUDGET_MB = 1024  # one sample's calibrated tensors captured per session at most (larger: in groups)
TYPES = ("u8s8", "s8s8", "u8u8")


def vnni_missing() -> bool:
    """True on an x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI or AMX): ONNX Runtime's u8s8/s8s8 integer
    kernels then multiply-add pairs into int16 (VPMADDUBSW) and saturate; 7-bit weights avoid it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
        return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
    except OSError:  # no /proc (Windows, macOS): numpy's own CPU feature table
        from numpy._core._multiarray_umath import __cpu_features__

        return not __cpu_features__.get("AVX512VNNI", False)


def _default_reduce_range(target: Target, types: str) -> str:
    """reduce_range's default: 1 where the integer kernels run on this CPU and would saturate, else 0."""
    if not backend_of(target).cpu_integer_kernels(target) or types == "u8u8" or not vnni_missing():
        return "0"
    if target.runtime not in _said_saturation:
        _said_saturation.append(target.runtime)
        log.warning("This CPU has no VNNI: %s's %s integer kernels saturate their int16 sums here, so %s quantizes weights to 7 bits "
                    "(reduce_range=1, ONNX Runtime's advice for such CPUs). Pass @reduce_range=0 to see the saturation.",
                    backend_of(target).title, types, target.base)
    return "1"


_said_saturation: list[str] = []  # runtimes warned about


@dataclass(frozen=True)
class QuantSettings:
    """ONNX Runtime quantizer settings of one INT8 target (recorded in results and plans)."""

    calibrate: str = "minmax"
    types: str = "u8s8"
    reduce_range: bool = False
    per_channel: bool = True
    percentile: float = 99.999
    symmetric: bool = False  # activations: zero point 0 (weights are symmetric in every setting)
    fallback: str = "fp32"  # what is not quantized runs in this precision (mixed INT8 + FP16 with "fp16")
    quantize_bias: bool = True  # biases as int32 Q/DQ (ONNX Runtime's default); TensorRT takes float biases only

    @classmethod
    def of(cls, target: Target) -> "QuantSettings":
        """The settings a target's options give (defaults for the rest); a bad value is a TargetError."""
        o, runtime = target.option_dict, backend_of(target)
        defaults = runtime.int8_defaults  # what the runtime's INT8 kernels take (TensorRT: s8s8 symmetric, float biases)
        calibrate = choice_option(target, "calibrate", o.get("calibrate", "minmax"), CALIBRATE)
        types = choice_option(target, "types", o.get("types", defaults.get("types", "u8s8")), TYPES)
        flags = {k: choice_option(target, k, o.get(k, defaults.get(k, d)), ("0", "1")) == "1"
                 for k, d in (("reduce_range", _default_reduce_range(target, types)), ("per_channel", "1"), ("symmetric", "0"),
                              ("quantize_bias", "1"))}
        given = {"types": types, **{k: str(int(v)) for k, v in flags.items()}}
        if any(given[k] != defaults[k] for k in runtime.int8_forced if k in defaults and k != "reduce_range"):
            forced = ", ".join(f"{k}={defaults[k]}" for k in runtime.int8_forced if k in defaults and k != "reduce_range")
            raise TargetError(f"Target {target}: {runtime.title} takes {runtime.int8_takes or 'INT8'} only ({forced}: the defaults "
                              f"of {target.base}); leave those options out.")
        try:
            percentile = float(o.get("percentile", "99.999"))
        except ValueError:
            percentile = -1.0
        if not 0 < percentile <= 100:
            raise TargetError(f"Target {target}: percentile={o.get('percentile')!r}; give a number in (0, 100], e.g. 99.99.")
        fallback = choice_option(target, "fallback", o.get("fallback", "fp32"), FALLBACK)
        if fallback != "fp32" and runtime.cpu_integer_kernels(target):
            raise TargetError(f"Target {target}: fallback={fallback} needs a runtime that computes in {fallback}: ONNX Runtime's CPU "
                              f"provider runs most FP16 ops in FP32. Use ort:cuda:int8 or trt:int8, or emu:int8@fallback={fallback} "
                              "to emulate it here.")
        return cls(calibrate, types, flags["reduce_range"], flags["per_channel"], percentile, flags["symmetric"], fallback,
                   flags["quantize_bias"])

    def options(self) -> dict[str, str]:
        """These settings as target options (``target.with_options(settings.options())``)."""
        return {"calibrate": self.calibrate, "types": self.types, "reduce_range": str(int(self.reduce_range)),
                "per_channel": str(int(self.per_channel)), **({"percentile": f"{self.percentile:g}"} if self.calibrate == "percentile" else {}),
                **({"symmetric": "1"} if self.symmetric else {}), **({"fallback": self.fallback} if self.fallback != "fp32" else {}),
                **({} if self.quantize_bias else {"quantize_bias": "0"})}

    def describe(self) -> str:
        return (f"{self.calibrate}{f' {self.percentile:g}' if self.calibrate == 'percentile' else ''} {self.types}"
                f"{' reduce_range' if self.reduce_range else ''}{' per-channel' if self.per_channel else ' per-tensor'}"
                f"{' symmetric' if self.symmetric else ''}{f', {self.fallback} fallback' if self.fallback != 'fp32' else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


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


def engine_target(target: Target) -> Target:
    """The TensorRT target a QDQ model of ``trt:int8`` is built on: FP32 types (the Q/DQ say where it
    runs INT8), TensorRT's builder settings and the capture policy, not the quantizer's settings."""
    from aligner.backends.trt.engine import TRT_OPTIONS

    options = {k: v for k, v in target.options if k in TRT_OPTIONS or k == "capture"}
    return Target("trt", "cuda", "fp32", options=tuple(sorted(options.items())))


def session_target(target: Target) -> Target:
    """The target ONNX Runtime sessions of the QDQ model run under: the session options only."""
    options = {k: v for k, v in target.options if k not in QUANT_OPTIONS}
    return Target(target.runtime, target.device, target.precision, options=tuple(sorted(options.items())))


__all__ = ["CALIBRATE", "CalibrationState", "calibration_state", "FALLBACK", "PER_CHANNEL_OPSET", "QUANT_OPTIONS", "QuantSettings", "QuantizedModel", "TYPES", "calibrate_ranges",
           "calibration_of", "engine_target", "low_precision_fallback", "quantizable_model", "quantize", "save_quantized", "session_target"]
