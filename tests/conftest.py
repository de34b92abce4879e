"""Real models for the tests: built in code, exported from PyTorch by both exporters.

The builders live in :mod:`aligner.examples.testmodels` (the benchmarks use them too); the names
below are the ones the tests import from here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from aligner.examples import example_inputs, tiny_vit
from aligner.examples.testmodels import build_cnn, build_deep_mlp, build_detector, build_detr, export_detr_with_mask
from aligner.examples.testmodels import export_detr as _export_detr
from aligner.examples.testmodels import export_onnx as _export

__all__ = ["_export", "build_cnn", "build_deep_mlp", "build_detector", "build_detr", "export_detr", "export_detr_with_mask",
           "np_close", "random_feeds"]


@pytest.fixture(scope="session")
def vit_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.onnx"
    onnx.save(tiny_vit(), str(path))
    return path


@pytest.fixture(scope="session")
def vit_inputs() -> dict:
    return example_inputs()


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def cnn_path(request, tmp_path_factory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("cnn") / f"cnn_{request.param}.onnx"
    return _export(build_cnn(), (torch.randn(1, 3, 32, 32),), path, request.param == "dynamo")


_DETR_CACHE: dict[str, Path] = {}


def export_detr(kind: str, directory: Path) -> Path:
    """DETR (transformers, random weights) exported by the legacy or the dynamo exporter, once per session."""
    if kind not in _DETR_CACHE:
        _DETR_CACHE[kind] = _export_detr(kind, directory)
    return _DETR_CACHE[kind]


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def detr_path(request, tmp_path_factory) -> Path:
    return export_detr(request.param, tmp_path_factory.mktemp("detr"))


@pytest.fixture(scope="session")
def detr_legacy_path(tmp_path_factory) -> Path:
    """The legacy export keeps DETR's index constants as Gather nodes (the seed's DETR case)."""
    return export_detr("legacy", tmp_path_factory.mktemp("detr"))


def random_feeds(graph, seed=0):
    from aligner.inputs import make_inputs

    return make_inputs(graph, seed=seed)


def np_close(a, b, tol=1e-5):
    return np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=tol)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``aligner demo`` run once for the session: (exit code, what it printed, its folder)."""
    import contextlib
    import io

    from aligner.cli.main import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out)])
    return code, printed.getvalue(), out
