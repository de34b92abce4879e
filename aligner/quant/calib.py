"""Calibration data for INT8 targets: an .npz of inputs, or a folder of them, read one sample at a time.

The source is the target's ``calib`` option (``ort:cpu:int8@calib=calib/``; the CLI's ``--calib``
sets it). Without one, the quantizer calibrates on the command's generated inputs, with a warning:
calibrating on the data a comparison then measures overstates accuracy.

Samples stay on disk (:class:`CalibrationSamples` reads one when asked), and the value ranges are
computed by :mod:`aligner.quant.ranges` sample by sample, so memory does not grow with their number.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aligner.errors import InputError
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds, load_inputs, make_inputs, validate_feeds

log = logging.getLogger(__name__)

NO_CALIB_WARNING = ("INT8 target without calibration data (--calib): ONNX Runtime's quantizer calibrates on the "
                    "command's own inputs, which overstates accuracy (the test data is the calibration data). "
                    "Pass --calib FILE.npz or --calib DIR/ with representative inputs.")


Progress = Callable[[str, int, int], None]  # (phase, done, total)
_PROGRESS: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("aligner_int8_progress", default=None)


@contextlib.contextmanager
def reporting(progress: Progress | None):
    """Within the block, INT8's long phases (calibration, the settings sweep, the ranking) call
    ``progress(phase, done, total)`` as they go (the CLI shows it); library code never prints."""
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report(phase: str, done: int, total: int) -> None:
    """Tell the caller of :func:`reporting` (if any) how far ``phase`` is; logged at debug level too."""
    log.debug("%s %d/%d", phase, done, total)
    progress = _PROGRESS.get()
    if progress is not None:
        progress(phase, done, total)


class CalibrationSamples(Sequence):
    """The samples of a calibration source, read from disk when asked (one file held at a time):
    hundreds of images cost one sample's memory. ``index``: (file, sample within the file) per sample;
    ``generated``: samples held in memory instead (the generated inputs)."""

    def __init__(self, graph: ModelGraph, index: Sequence[tuple[Path, int]] = (), generated: Sequence[Feeds] = ()):
        self._graph, self._index, self._generated = graph, tuple(index), tuple(generated)
        self._file: tuple[Path | None, list[Feeds]] = (None, [])

    def __len__(self) -> int:
        return len(self._generated) or len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._generated:
            return self._generated[i]
        path, k = self._index[i]
        if self._file[0] != path:
            self._file = (path, [validate_feeds(self._graph, s) for s in load_inputs(path)])
        return self._file[1][k]


class ChainedSamples(Sequence):
    """Several sample sequences read as one, lazily (``[*a, *b]`` would load every calibration sample)."""

    def __init__(self, *parts: Sequence[Feeds]):
        self._parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        for part in self._parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def __iter__(self) -> Iterator[Feeds]:
        for part in self._parts:
            yield from part


@dataclass(frozen=True)
class Calibration:
    """Calibration samples (read from disk when asked), where they came from, and a key identifying
    their values (for caches)."""

    samples: Sequence[Feeds]
    source: str  # the path, or "generated inputs"
    key: str

    def to_dict(self) -> dict:
        return {"source": self.source, "samples": len(self.samples), "sha": self.key}


def calibration_files(source: str | Path) -> list[Path]:
    """The .npz files of ``source`` (a file or a folder); a clear InputError when there are none."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise InputError(f"--calib {source}: the folder holds no .npz files. Save calibration inputs with "
                             "numpy.savez(DIR/'0.npz', input_name=array), one file per sample or batch.")
        return files
    if not path.exists():
        raise InputError(f"--calib {source}: no such file or folder. Give an .npz of inputs (named like the model's "
                         "inputs) or a folder of .npz files.")
    if path.suffix not in (".npz", ".json"):
        raise InputError(f"--calib {source}: expected an .npz file (or Polygraphy JSON inputs) or a folder of .npz files.")
    return [path]


def check_calibration_source(source: str | Path) -> None:
    """Fail early (before long work) on a missing or empty calibration source."""
    calibration_files(source)


def load_calibration(graph: ModelGraph, source: str | Path | None) -> Calibration:
    """The samples of ``source`` checked against ``graph``'s inputs; None: the generated inputs (seed 0,
    what a command generates when given no --inputs), with :data:`NO_CALIB_WARNING`."""
    h = hashlib.sha256()
    if source is None:
        log.warning(NO_CALIB_WARNING)
        samples = CalibrationSamples(graph, generated=[make_inputs(graph)])
        _digest(h, samples[0])
        return Calibration(samples, "generated inputs (no --calib: accuracy is overstated)", h.hexdigest()[:16])
    index = []
    for f in calibration_files(source):  # each file read once here (checked and hashed), then dropped
        for k, sample in enumerate(load_inputs(f)):
            _digest(h, validate_feeds(graph, sample))
            index.append((f, k))
    if not index:
        raise InputError(f"--calib {source}: no input samples in it.")
    return Calibration(CalibrationSamples(graph, index), str(source), h.hexdigest()[:16])


def _digest(h, feeds: Feeds) -> None:
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        h.update(name.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())


__all__ = ["Calibration", "CalibrationSamples", "ChainedSamples", "NO_CALIB_WARNING", "Progress", "calibration_files", "check_calibration_source", "calibrate_targets", "load_calibration", "report", "reporting",
           "with_calibration"]


def with_calibration(target, calib: str | None = None, inputs: str | None = None):
    """``target`` (an INT8 Target) with its calibration source: ``calib`` (``--calib``) wins over the
    target's own ``calib`` option; without either, the command's ``inputs`` file, with a warning
    (the runner warns likewise when it falls back to generated inputs). Other targets unchanged.
    A ``+plan.json`` target calibrates on what its plan was verified with (the plan's data, which
    target parsing put in ``calib``, or generated inputs), never on ``inputs``; other or changed data
    is refused (:func:`aligner.backends.replay.check_calibration`)."""
    from aligner.backends.replay import check_calibration, planned_calibration

    if not target.is_quantized:
        if calib:
            log.warning("--calib %s is ignored: %s is not an INT8 target.", calib, target)
        return target
    planned = planned_calibration(target.plan) if target.plan else None
    source = calib or target.option_dict.get("calib")
    if source:
        if planned is None:  # a plan's data is checked by check_calibration, which names the plan
            check_calibration_source(source)
        target = target.with_options({"calib": str(source)})
        check_calibration(target)
        return target
    if planned is not None:
        check_calibration(target)
        return target
    if inputs:
        log.warning("%s Calibrating on --inputs %s.", NO_CALIB_WARNING, inputs)
        return target.with_options({"calib": str(inputs)})
    return target


def calibrate_targets(targets, calib: str | None, dataset, preprocess, input_name: str, count: int = 16):
    """Eval's INT8 targets with calibration: ``calib`` (``--calib``) or each target's own ``calib``
    option; else the first ``count`` images of ``dataset`` (preprocessed as evaluated), written as
    .npz to a temp folder, with a warning (calibrating on the evaluation images overstates accuracy).
    Returns (targets, the temp folder's handle or None: keep it alive while the targets run)."""
    import tempfile

    from aligner.backends.replay import planned_calibration

    def uncalibrated(t) -> bool:  # a +plan.json target calibrates as its plan was verified (its data, or generated inputs)
        return t.is_quantized and not t.option_dict.get("calib") and not (t.plan and planned_calibration(t.plan) is not None)

    if not any(t.is_quantized for t in targets):
        return list(targets), None
    if calib or not any(uncalibrated(t) for t in targets):
        return [with_calibration(t, calib) for t in targets], None
    folder = tempfile.TemporaryDirectory(prefix="aligner-calib-")
    for i, (x, _, _) in enumerate(dataset.batches(preprocess, 1)):
        if i >= count:
            break
        np.savez(Path(folder.name) / f"{i:04d}.npz", **{input_name: x})
    log.warning("INT8 target without --calib: calibrating on the first %d evaluation images, which overstates accuracy "
                "(the test data is the calibration data). Pass --calib DIR/ with other representative images.", count)
    return [with_calibration(t, folder.name if uncalibrated(t) else None) for t in targets], folder
