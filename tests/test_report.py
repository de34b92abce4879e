"""The HTML report: rendered from real runs, opened in headless Chromium, hostile names shown as text."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aligner.cli.main import main
from aligner.graph.model import ModelGraph
from aligner.report import read_run, render_report, write_run
from aligner.search import bisect
from aligner.search.precision import search_precision
from aligner.compare import compare

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
HOSTILE = "<img src=x onerror=alert(1)>"


def _chromium(tmp_path, url: str, *action: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--window-size=1280,2400", "--hide-scrollbars", *action, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_demo_report_renders_in_headless_chromium(tmp_path, demo_run):
    code, _, folder = demo_run
    assert code == 0
    page = (folder / "report.html").resolve()
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html) and "<link" not in html  # nothing fetched
    dom = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == []  # no script errors, no console output at all
    assert dom.stdout.count("<svg") >= 2 and dom.stdout.count("<path") > 50  # both charts drawn, not empty
    assert "/stem_norm/Pow" in dom.stdout and "nonfinite" in dom.stdout  # the culprit and its kind
    assert "emu:fp16+plan" in dom.stdout and "0.83" in dom.stdout  # the mAP table
    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}")
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000


def _hostile_model() -> onnx.ModelProto:
    """x*1000 then squared: the square overflows FP16; both nodes carry markup in their names."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["<b>scaled</b>"], name=HOSTILE),
        helper.make_node("Pow", ["<b>scaled</b>", "two"], ["sq"], name="<script>alert('pow')</script>"),
        helper.make_node("ReduceMean", ["sq"], ["y"], name="mean", keepdims=0),
    ]
    init = [onnx.numpy_helper.from_array(np.array(1000.0, np.float32), "k"), onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    return helper.make_model(helper.make_graph(nodes, "hostile", [x], [y], init), opset_imports=[helper.make_opsetid("", 16)])


def _hostile_report(tmp_path) -> str:
    graph = ModelGraph(_hostile_model())
    feeds = {"x": np.linspace(0.1, 1.0, 64, dtype=np.float32)[None]}
    runs = [
        write_run(tmp_path / "c", "compare", graph, compare(graph, target="emu:fp16", feeds=feeds).to_dict()),
        write_run(tmp_path / "b", "bisect", graph, bisect(graph, target="emu:fp16", feeds=feeds).to_dict()),
        write_run(tmp_path / "p", "precision", graph, search_precision(graph, samples=[feeds]).to_dict()),
    ]
    return render_report([read_run(r) for r in runs])


def test_names_from_the_model_are_escaped_in_the_html(tmp_path):
    html = _hostile_report(tmp_path)
    assert "alert('pow')</script>" not in html and "<img src=x" not in html and "<b>scaled" not in html
    assert "&lt;script&gt;alert(&#39;pow&#39;)&lt;/script&gt;" in html  # the culprit, escaped


@needs_chromium
def test_names_from_the_model_are_text_in_the_browser(tmp_path):
    page = tmp_path / "hostile.html"
    page.write_text(_hostile_report(tmp_path))
    dom = _chromium(tmp_path, page.resolve().as_uri(), "--dump-dom")
    assert "<img" not in dom.stdout  # no element was made from a name...
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom.stdout  # ...it is text on the page
    assert _console_messages(dom.stderr) == []


def test_report_cli_needs_run_directories(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    code = main(["report", str(tmp_path / "not-a-run"), "-o", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "not an aligner run directory" in err and "--run" in err
