"""Story 3 of the design (Mask R-CNN → ONNX): PyTorch and ONNX Runtime disagree after the
proposal stage. A small two-stage detector built here (no torchvision): a scorer rates anchors,
TopK keeps the best, NMS (exported as ONNX ``NonMaxSuppression``) removes overlaps, and a
second-stage head refines the kept boxes. Two anchors tie at the TopK cut: ONNX's TopK keeps the
lower index (its spec), this PyTorch implementation the higher one (as a GPU kernel may; PyTorch
does not specify tie order) — both correct. aligner's torch comparison must call that a
``discrete`` flip at the TopK and not blame the head after it; with no tie and a head whose export
really differs, it must blame the head (``local``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from aligner.compare.torch_compare import compare_torch  # noqa: E402

from aligner.examples.two_stage import K, TwoStage  # noqa: E402
from aligner.examples.two_stage import features as _features  # noqa: E402


def test_tied_topk_is_a_discrete_flip_not_the_heads_fault(tmp_path):
    torch.manual_seed(0)
    model = TwoStage().eval()
    x = torch.from_numpy(_features(tie=True))
    result = compare_torch(model, [x], onnx=tmp_path / "two_stage.onnx")
    ops = {n.op_type for n in __import__("onnx").load(tmp_path / "two_stage.onnx").graph.node}
    assert {"TopK", "NonMaxSuppression"} <= ops
    first = result.first_divergent
    assert first is not None and first.path == "topk"  # the picked indices differ first
    cause = result.root_cause
    assert cause is not None and cause.kind == "discrete"
    assert cause.op_type == "TopK" and cause.margin is not None and cause.margin.gap == 0.0
    assert "head" in cause.inheriting  # the head diverges, and is said to inherit the flip
    head = next(m for m in result.modules if m.path == "head")
    assert head.diverges
    assert "discrete" in result.verdict() and "do not blame" in result.verdict()
    assert result.to_dict()["root_cause"]["kind"] == "discrete"


def test_a_head_whose_export_differs_is_blamed_when_nothing_ties(tmp_path):
    torch.manual_seed(0)
    model = TwoStage(faulty_head=True).eval()
    x = torch.from_numpy(_features(tie=False))
    result = compare_torch(model, [x], onnx=tmp_path / "two_stage.onnx")
    assert not next(m for m in result.modules if m.path == "topk").diverges
    cause = result.root_cause
    assert result.first_divergent.path.startswith("head")
    assert cause is not None and cause.kind == "local" and cause.module.startswith("head")
