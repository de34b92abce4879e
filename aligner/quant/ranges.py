"""Value ranges for ONNX Runtime's quantizer, computed sample by sample: memory flat in the sample count.

ONNX Runtime's histogram calibrators (entropy, percentile) keep every calibrated tensor of every
sample until they build their histograms (``HistogramCalibrater.collect_data``): at 1x3x1024x800 a
DBNet's activations are about a GB per sample, so 16 samples do not fit in 24 GiB. Here:

* **minmax** alone: ONNX Runtime's own ``MinMaxCalibrater`` (``create_calibrator``), its
  ``collect_data`` called once per sample: it reduces each tensor to its min and max inside the
  graph and merges them as it goes (its ``CalibMaxIntermediateOutputs`` is not used: it clears the
  collected outputs *without* merging them, losing samples).
* **entropy / percentile** (and minmax with them): two passes over the samples, one sample's
  tensors alive at a time. Pass 1 takes each tensor's min, max and smallest magnitude; pass 2 adds up
  per-sample histograms over the *final* range, which ONNX Runtime's all-at-once histogram (on the
  same range) equals exactly (a histogram over fixed bins is a sum over samples). The thresholds are
  ONNX Runtime's own ``HistogramCollector`` (``compute_entropy`` / ``compute_percentile``) on those
  histograms, the results its ``TensorsData``; one pass serves every method asked for (the settings
  sweep asks for all three at once).

The tensors are the calibrator's own choice (``select_tensors_to_calibrate``); when one sample's
tensors exceed ``budget_mb`` they are captured in groups, one session per group (same ranges). The
ranges go to JSON files through ``save_tensors_data``, which ``quantize_static`` reads as its
``calibration_cache_path``: the quantizer itself never calibrates.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from aligner.inputs import Feeds
from aligner.quant.calib import report

HISTOGRAM_METHODS = ("entropy", "percentile")
# ONNX Runtime's create_calibrator defaults (quantize_static passes none of these unless asked):
# entropy 128 bins over [-t, t] of the values, percentile 2048 bins over [min|x|, max|x|] (symmetric).
_COLLECTOR = {"entropy": {"symmetric": False, "num_bins": 128, "num_quantized_bins": 128},
              "percentile": {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 2048}}


def calibrate(model_path: str | Path, samples: Sequence[Feeds], methods: Sequence[str], percentile: float = 99.999,
              budget_mb: float = 1024) -> dict:
    """ONNX Runtime ``TensorsData`` per method in ``methods`` (minmax, entropy, percentile) for the
    float model at ``model_path`` over ``samples``, streaming (see the module's docstring)."""
    unknown = set(methods) - {"minmax", *HISTOGRAM_METHODS}
    if unknown:
        raise ValueError(f"unknown calibration method(s) {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="aligner-calib-") as tmp, _quiet():
        if not set(methods) & set(HISTOGRAM_METHODS):
            return {"minmax": _minmax_by_ort(Path(model_path), samples, Path(tmp))}
        return _two_passes(Path(model_path), samples, methods, percentile, budget_mb, Path(tmp))


def save_ranges(tensors_data, path: str | Path) -> None:
    """Write ranges where ``quantize_static(calibration_cache_path=...)`` reads them."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(tensors_data, Path(path))


class _One:
    """A CalibrationDataReader of one sample (ONNX Runtime's readers are duck-typed: get_next)."""

    def __init__(self, feeds: Feeds):
        self._feeds = feeds

    def get_next(self):
        feeds, self._feeds = self._feeds, None
        return feeds


def _minmax_by_ort(model: Path, samples: Sequence[Feeds], tmp: Path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(model, None, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, extra_options={})
    for i, feeds in enumerate(samples):
        calibrator.collect_data(_One(feeds))  # reduces to min/max in the graph and merges: nothing kept per sample
        report("calibrating minmax", i + 1, len(samples))
    return calibrator.compute_data()


def _two_passes(model: Path, samples: Sequence[Feeds], methods: Sequence[str], percentile: float, budget_mb: float, tmp: Path) -> dict:
    from onnxruntime.quantization.calibrate import CalibrationMethod, HistogramCollector, MinMaxCalibrater, TensorsData

    base = MinMaxCalibrater(model, None, augmented_model_path=str(tmp / "unused.onnx"))  # loads with shape inference
    tensors, infos = base.select_tensors_to_calibrate(base.model)
    names = [t for t in _topological(base.model) if t in tensors]
    groups = _groups(base.model, names, samples[0], budget_mb)
    hist_methods = [m for m in HISTOGRAM_METHODS if m in methods]
    stats: dict[str, list] = {}  # name -> [min, max, min |x|] (numpy scalars of the tensor's type)
    hists: dict[str, dict[str, list]] = {m: {} for m in hist_methods}  # method -> name -> [counts, edges]
    total = 2 * len(groups) * len(samples)
    done = 0
    label = ", ".join(m for m in ("minmax", *HISTOGRAM_METHODS) if m in methods)
    for phase in ("value ranges", "histograms"):
        for group in groups:
            session = _session(base.model, group, infos, tmp)
            for feeds in samples:
                values = dict(zip(group, session.run(group, dict(feeds))))
                if phase == "value ranges":
                    _add_stats(stats, values)
                else:
                    _add_histograms(hists, stats, values)
                done += 1
                report(f"calibrating {label} (pass {1 if phase == 'value ranges' else 2} of 2: {phase})", done, total)
            del session
    out = {}
    if "minmax" in methods:  # what MinMaxCalibrater.compute_data gives: (1,)-shaped arrays
        out["minmax"] = TensorsData(CalibrationMethod.MinMax, {n: (np.array([lo]), np.array([hi])) for n, (lo, hi, _) in stats.items()})
    for method in hist_methods:
        settings = _COLLECTOR[method]
        collector = HistogramCollector(method=method, symmetric=settings["symmetric"], num_bins=settings["num_bins"],
                                       num_quantized_bins=settings["num_quantized_bins"], percentile=percentile, scenario="same")
        collector.histogram_dict = {n: _collector_entry(method, h, stats[n]) for n, h in hists[method].items()}
        out[method] = TensorsData(CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.Percentile,
                                  collector.compute_collection_result())
    return out


def _add_stats(stats: dict[str, list], values: Mapping[str, np.ndarray]) -> None:
    for name, x in values.items():
        x = np.asarray(x)
        if x.size == 0:
            lo = hi = small = np.zeros((), x.dtype)[()]
        else:
            lo, hi, small = np.nanmin(x), np.nanmax(x), np.nanmin(np.abs(x))
        if name in stats:
            old = stats[name]
            lo, hi, small = np.fmin(old[0], lo), np.fmax(old[1], hi), np.fmin(old[2], small)
        stats[name] = [lo, hi, small]


def _add_histograms(hists: dict[str, dict[str, list]], stats: dict[str, list], values: Mapping[str, np.ndarray]) -> None:
    """Each sample's histogram over the tensor's final range, as ONNX Runtime bins all samples at once
    (``HistogramCollector.collect_value`` for entropy, ``collect_absolute_value`` for percentile)."""
    for name, x in values.items():
        x = np.asarray(x).ravel()
        lo, hi, small = stats[name]
        for method, table in hists.items():
            if method == "entropy":
                threshold = np.array(max(abs(lo), abs(hi)), dtype=x.dtype)
                counts, edges = np.histogram(x, _COLLECTOR[method]["num_bins"], range=(-threshold, threshold))
            else:
                top = np.array(max(abs(lo), abs(hi)), dtype=x.dtype)[()]
                counts, edges = np.histogram(np.abs(x), bins=_COLLECTOR[method]["num_bins"], range=(small, top))
                edges = edges.astype(x.dtype)
            if name in table:
                table[name][0] += counts
            else:
                table[name] = [counts, edges]


def _collector_entry(method: str, hist: list, stat: list) -> tuple:
    counts, edges = hist
    lo, hi, _ = stat
    if method == "entropy":
        return counts, edges, lo, hi, np.array(max(abs(lo), abs(hi)), dtype=edges.dtype)
    return counts, edges, lo, hi


def _topological(model: onnx.ModelProto) -> list[str]:
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        names += [o for o in node.output if o]
    return names


def _groups(model: onnx.ModelProto, names: list[str], feeds: Feeds, budget_mb: float) -> list[list[str]]:
    """``names`` in groups whose bytes for one sample fit ``budget_mb`` (sizes from shape inference with
    the sample's input shapes; a tensor of unknown size counts 4 MB)."""
    from aligner.compare.layerwise import estimate_sizes, plan_groups
    from aligner.graph.model import ModelGraph

    return plan_groups(names, estimate_sizes(ModelGraph(model), dict(feeds)), int(budget_mb * 2**20))


def _session(model: onnx.ModelProto, outputs: list[str], infos: dict, tmp: Path):
    """A session of ``model`` whose outputs are ``outputs`` (ONNX Runtime's calibrators' session options:
    no graph optimization, so the tensors are the model's own; no memory arena, so memory is returned)."""
    import onnxruntime

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    augmented.graph.output.extend(infos[n] for n in outputs)
    path = tmp / "augmented.onnx"
    onnx.save(augmented, str(path), save_as_external_data=augmented.ByteSize() > 2**31 - 2**24)
    del augmented
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's collectors print progress and divide by zero on empty histograms (a
    RuntimeWarning per tensor): neither reaches the user (our progress goes through :func:`report`)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


__all__ = ["HISTOGRAM_METHODS", "calibrate", "save_ranges"]
