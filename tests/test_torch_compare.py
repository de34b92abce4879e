"""PyTorch module outputs matched to ONNX tensors, and disagreements localized to the module."""

from __future__ import annotations

from pathlib import Path

import pytest

from aligner.compare.torch_compare import compare_torch, export_onnx
from aligner.errors import InputError, TargetError
from conftest import build_cnn, build_detr
from aligner.examples.faults import edit_constant


def _detr_r50():
    from transformers import DetrConfig, ResNetConfig

    return build_detr(DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig(), use_pretrained_backbone=False)), 128


def _cvt13():
    import torch
    from transformers import CvtConfig, CvtForImageClassification

    class Cvt(torch.nn.Module):  # CvtConfig() is CvT-13; random weights
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.cvt = CvtForImageClassification(CvtConfig()).eval()

        def forward(self, pixel_values):
            return self.cvt(pixel_values=pixel_values).logits

    return Cvt().eval(), 224


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("build", [_detr_r50, _cvt13], ids=["detr-r50", "cvt-13"])
def test_leaf_modules_of_the_seeds_models_are_matched(build, exporter, capsys):
    import torch

    model, size = build()
    result = compare_torch(model, (torch.randn(1, 3, size, size),), exporter=exporter)
    with capsys.disabled():
        print(f"\n{build.__name__.strip('_')} ({exporter}): leaf coverage {result.leaf_coverage:.1%}, "
              f"{len(result.modules)} module outputs matched, {len(result.unmatched)} unmatched")
    assert result.leaf_coverage >= 0.9
    assert result.first_divergent is None  # eager PyTorch and ONNX Runtime agree module by module
    assert all(u["reason"] for u in result.unmatched)


def test_fused_modules_are_listed_with_the_reason():
    import torch

    result = compare_torch(build_cnn(), (torch.randn(1, 3, 32, 32),))  # legacy export folds BatchNorm into Conv
    convs = {u["module"] for u in result.unmatched}
    assert "layer1.conv1" in convs and any("fused" in u["reason"] for u in result.unmatched)
    assert any(m.path == "layer1.bn1" for m in result.modules)  # the fused Conv's output is the BN's


def test_an_edited_onnx_node_is_localized_to_its_module(tmp_path):
    import torch

    model, x = build_detr(), torch.randn(1, 3, 96, 96)
    clean = tmp_path / "detr.onnx"
    export_onnx(model, (x,), clean)
    edit_constant(clean, tmp_path / "edited.onnx", "/detr/model/encoder/layers.1/mlp/fc1/MatMul", 1, lambda w: w * 1.5)
    result = compare_torch(model, (x,), onnx=clean, target_model=tmp_path / "edited.onnx")
    assert result.first_divergent.path == "detr.model.encoder.layers.1.mlp.fc1"


def test_a_module_traced_differently_from_eager_is_localized(tmp_path):
    import torch
    from torch import nn

    class Rescale(nn.Module):  # float(...) is traced as a constant: the export ignores the input
        def forward(self, x):
            return x / float(x.abs().max())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.rescale, self.head = nn.Conv2d(3, 8, 3), Rescale(), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.rescale(self.conv(x))))

    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "net.onnx"
    trouble = export_onnx(net, (torch.randn(1, 3, 16, 16),), path)
    assert any("constant" in w.lower() or "trace" in w.lower() for w in trouble)  # the exporter said so
    result = compare_torch(net, (3 * torch.randn(1, 3, 16, 16),), onnx=path)  # other inputs than the export's
    assert result.first_divergent.path == "rescale"


def test_bad_inputs_are_named(tmp_path):
    import torch

    with pytest.raises(InputError, match="takes 1 input"):
        path = tmp_path / "cnn.onnx"
        export_onnx(build_cnn(), (torch.randn(1, 3, 32, 32),), path)
        compare_torch(build_cnn(), (torch.randn(1, 3, 32, 32), torch.randn(1)), onnx=path)

    with pytest.raises(InputError, match=r"expected .*32.*given|shape"):
        compare_torch(build_cnn(), (torch.randn(1, 3, 48, 48),), onnx=path)  # the ONNX model was exported at 32x32
    with pytest.raises(InputError, match=r"PyTorch model failed on inputs of shape \[\(1, 5, 32, 32\)\]"):
        compare_torch(build_cnn(), (torch.randn(1, 5, 32, 32),), target="torch:cpu:fp32")

    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eig(x)[0]  # complex eigenvalues: ONNX has no such operator

    with pytest.raises(InputError, match="failed to export.*linalg_eig"):
        export_onnx(Eig(), (torch.randn(3, 3),), tmp_path / "eig.onnx")


def test_cli_compare_torch_factory(tmp_path, capsys, monkeypatch):
    import json

    import numpy as np

    from aligner.cli.main import main

    (tmp_path / "mymodels.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom conftest import build_cnn\n\ndef build():\n    return build_cnn()\n" % str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    code = main(["compare", str(tmp_path / "cnn.onnx"), "--torch", "mymodels:build", "--torch-inputs", str(tmp_path / "x.npz"),
                 "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert code == 0 and "leaf coverage" in out and "exported with the legacy exporter" in out
    assert json.loads((tmp_path / "t.json").read_text())["summary"]["first_divergent"] is None
    code = main(["compare", str(tmp_path / "cnn.onnx"), "--torch", "mymodels:biuld"])
    assert code == 2 and "Did you mean: 'build'" in capsys.readouterr().err
    code = main(["compare", str(tmp_path / "cnn.onnx"), "--torch", "not_a_module:build"])
    assert code == 2 and "cannot import 'not_a_module'" in capsys.readouterr().err


def test_torch_targets_compare_module_by_module():
    import torch

    same = compare_torch(build_cnn(), (torch.randn(1, 3, 32, 32),), target="torch:cpu:fp32")
    assert same.first_divergent is None and len(same.modules) > 10
    assert all(m.metrics["max_abs"] == 0 for m in same.modules)  # deterministic CPU eager
    with pytest.raises(TargetError, match="torch:cuda:fp16"):  # the one target parser lists the valid ones
        compare_torch(build_cnn(), (torch.randn(1, 3, 32, 32),), target="torch:tpu:fp8")
