"""Issue 20: compare_torch removes the temporary export it makes."""

from __future__ import annotations

import tempfile

import pytest

torch = pytest.importorskip("torch")

from aligner.compare.torch_compare import compare_torch  # noqa: E402


def test_compare_torch_leaves_no_export_folder_behind(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2)).eval()
    result = compare_torch(net, (torch.randn(1, 3, 8, 8),))
    assert not list(scratch.glob("aligner-torch-*"))
    assert result.modules and result.first_divergent is None
    assert any("temporary" in note for note in result.notes)
