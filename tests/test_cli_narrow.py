"""Every command's output read at 80 columns, as a CI log or a pipe sees it: no line longer than 80
characters, and no node name wrapped mid-name (a name is whole on its line, or elided in the
middle with '…'); and an example in every --help."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from aligner.cli.main import build_parser, main
from test_doctor_models import fpn_detector
from test_first_hour import _classifier

PREFIX = "/model.backbone/stage_1/block.0/"  # real exporters' names: long, no spaces


@pytest.fixture(scope="module")
def long_names(tmp_path_factory):
    """The FPN detector (symbolic N x 3 x H x W, a BatchNormalization whose variance is inf in FP16)
    with node names of 40-60 characters."""
    root = tmp_path_factory.mktemp("narrow")
    model = fpn_detector()
    for node in model.graph.node:
        node.name = PREFIX + node.name.replace("/", ".")
    onnx.save(model, str(root / "det.onnx"))
    np.savez(root / "in.npz", x=np.random.default_rng(0).random((1, 3, 16, 24), dtype=np.float32))
    return root, [n.name for n in model.graph.node]


def _narrow(capsys, monkeypatch, *argv) -> tuple[int, str, str]:
    """The command as a CI log sees it: stdout not a terminal, 80 columns."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERM", "dumb")
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split("[│┃]", line)] if ("│" in line or "┃" in line) else [line.strip()]


def _wrapped_names(text: str, names: list[str]) -> list[str]:
    """Places where a node name is cut across two lines (or two rows of a table cell): one ends with
    the start of the name, the next begins with the rest."""
    lines = text.splitlines()
    bad = []
    for a, b in zip(lines, lines[1:]):
        ca, cb = _cells(a), _cells(b)
        pairs = zip(ca, cb) if len(ca) == len(cb) else [(a.strip(), b.strip())]
        for x, y in pairs:
            bad += [f"{a}\n{b}" for name in names for k in range(6, len(name)) if x.endswith(name[:k]) and y.startswith(name[k:])]
    return bad


COMMANDS = {
    "inspect": ["inspect", "{m}"],
    "compare": ["compare", "{m}", "--inputs", "{i}"],
    "bisect": ["bisect", "{m}", "--inputs", "{i}"],
    "precision": ["precision", "{m}", "--inputs", "{i}"],
    "build": ["build", "{m}", "--target", "ort:cpu:fp16", "--fp32-nodes", PREFIX + "backbone.stem.BatchNormalization",
              "--inputs", "{i}", "-o", "{t}/b.onnx"],
    "bench": ["bench", "{m}", "--inputs", "{i}", "--target", "ort:cpu:fp32", "--batch", "1,2", "--runs", "3", "--warmup", "1"],
    "doctor": ["doctor", "{m}", "--inputs", "{i}", "--bench-runs", "0", "--out", "{t}/doc"],
    "eval coco": ["eval", "coco", "--limit", "4", "--batch", "4"],
    "eval topk": ["eval", "topk", "{t}/cls.onnx", "--inputs", "{t}/cls.npz", "--targets", "ort:cpu:fp32,emu:fp16,emu:bf16"],
    "plugins": ["plugins", "list"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_reads_at_80_columns(capsys, monkeypatch, tmp_path, long_names, command):
    root, names = long_names
    if command == "eval topk":  # a classifier: logits out
        _classifier(tmp_path / "cls.onnx")
        np.savez(tmp_path / "cls.npz", x=np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32))
    argv = [a.format(m=root / "det.onnx", i=root / "in.npz", t=tmp_path) for a in COMMANDS[command]]
    code, out, err = _narrow(capsys, monkeypatch, *argv)
    assert code in (0, 1) and "Traceback" not in err, err[-2000:]
    assert out.strip(), "nothing printed"
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert _wrapped_names(out, names) == []
    if command == "doctor":  # the report on its run directories, at 80 columns too
        code, out, err = _narrow(capsys, monkeypatch, "report", *sorted((tmp_path / "doc" / "runs").iterdir()), "-o", tmp_path / "r.html")
        assert code == 0 and "Traceback" not in err and all(len(line) <= 80 for line in out.splitlines())


def _subparsers(parser, path=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))
            return
    yield path, parser


@pytest.mark.parametrize("path, parser", list(_subparsers(build_parser())), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_help_has_examples(path, parser):
    text = parser.format_help()
    assert "examples:" in text and "  aligner " in text, f"aligner {' '.join(path)} --help has no examples"
