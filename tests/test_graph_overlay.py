"""Model Explorer overlays: the example detector's FP16 overflow coloured on the node the viewer draws.

A compare and a bisect of the shipped detector on two images whose stem LayerNorm overflows FP16
(their centred pixels exceed 256, so the square passes 65504): the culprit is ``/stem_norm/Pow``.
The overlays must carry it under the id Model Explorer's ONNX adapter gives it (checked against the
adapter itself when the view extra is installed), and a real Chromium, driven over the DevTools
protocol, must show it selected and filled with the overlay's colour.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aligner import bisect, compare
from aligner._optional import installed
from aligner.cli.main import main
from aligner.eval.dataset import CocoDataset
from aligner.examples import shapes_detector_path, shapes_preprocess, shapes_val
from aligner.graph.model import ModelGraph
from aligner.report import write_graph_overlays, write_run
from aligner.report.graph_ids import viewer_node_ids
from aligner.report.node_data import FIRST, NONFINITE, badness, error_colour

CULPRIT = "/stem_norm/Pow"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_VIEWER = installed("model_explorer") and installed("model_explorer_onnx")
needs_viewer = pytest.mark.skipif(not HAS_VIEWER, reason="the view extra is not installed (pip install 'aligner[view]')")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def detector_runs(tmp_path_factory) -> tuple[Path, Path]:
    images, _, _ = next(CocoDataset(*shapes_val()).batches(shapes_preprocess(), 50))
    feeds = {"pixels": images[[38, 32]]}  # the two val images whose stem LayerNorm overflows FP16
    graph = ModelGraph.load(shapes_detector_path())
    root = tmp_path_factory.mktemp("runs")
    return (write_run(root / "compare", "compare", graph, compare(graph, target="emu:fp16", feeds=feeds).to_dict()),
            write_run(root / "bisect", "bisect", graph, bisect(graph, target="emu:fp16", feeds=feeds, strategy="all").to_dict()))


def _results(directory: Path, name: str) -> dict:
    return json.loads((directory / f"{name}.json").read_text())["results"]


def _adapter_nodes(path: Path) -> dict:
    """What Model Explorer's ONNX adapter makes of the file: node id -> (op label, output tensor names)."""
    from model_explorer_onnx.main import ONNXAdapter

    nodes = ONNXAdapter().convert(str(path), {})["graphs"][0].nodes
    return {n.id: (n.label, [next(kv.value for kv in m.attrs if kv.key == "__tensor_tag") for m in n.outputsMetadata]) for n in nodes}


def test_overlays_colour_the_fp16_culprit_and_its_path(detector_runs, tmp_path):
    out = write_graph_overlays(list(detector_runs), tmp_path / "graph")
    assert [p.name for p in out.files] == ["first-divergence.json", "accumulated-error.json", "local-error.json", "nan-inf.json"]
    first = _results(out.directory, "first-divergence")
    assert first[CULPRIT]["bgColor"] == FIRST and first[CULPRIT]["value"].startswith("first divergence: Pow of an input")
    assert first["/stem_norm/ReduceMean_1"] == {"value": "diverges downstream of the first", "bgColor": "#ff7f0e"}
    assert first["/stem_norm/Sub"]["value"] == "within tolerance"  # upstream of the culprit: matches
    assert [n for n, r in first.items() if r["bgColor"] == FIRST] == [CULPRIT]
    assert _results(out.directory, "nan-inf")[CULPRIT] == {"value": first[CULPRIT]["value"].replace("first divergence", "NaN/inf origin"),
                                                           "bgColor": NONFINITE}
    accumulated = _results(out.directory, "accumulated-error")
    assert accumulated[CULPRIT] == {"value": "NaN/inf", "bgColor": NONFINITE}
    conv = accumulated["/patchify/Conv"]  # FP16 rounding only: a number, coloured on the log scale below the tolerance
    assert 0 < conv["value"] < 0.02 and conv["bgColor"] == error_colour(badness("rel_l2", conv["value"], 0.02))
    assert CULPRIT in _results(out.directory, "local-error")
    # Every key is a node id of the file as the viewer names it (the detector's names are unique).
    ids = set(viewer_node_ids(onnx.load(shapes_detector_path(), load_external_data=False)).values())
    assert all(set(_results(out.directory, p.stem)) <= ids for p in out.files)
    index = json.loads((out.directory / "overlays.json").read_text())
    assert index["viewer_ids"][CULPRIT] == CULPRIT and index["graph"] == "main_graph"
    assert out.focus() == (CULPRIT, "first-divergence")


def test_error_colours_are_one_log_scale_around_the_tolerance_for_every_metric():
    ten_times = error_colour(1.0)  # an error 10x the tolerance looks the same whichever metric judged it
    assert error_colour(badness("rel_l2", 0.2, 0.02)) == error_colour(badness("max_abs", 1e-2, 1e-3)) == ten_times
    assert error_colour(badness("cosine", 0.99, 0.999)) == error_colour(badness("snr_db", 20.0, 40.0)) == ten_times
    assert error_colour(badness("rel_l2", 0.02, 0.02)) == "#fee08b" and error_colour(badness("rel_l2", 1e9, 0.02)) == "#a50026"
    assert error_colour(badness("snr_db", float("inf"), 40.0)) == error_colour(-3.0)  # identical tensors: the palest


@needs_viewer
def test_viewer_ids_match_model_explorer_on_unnamed_and_repeated_names(tmp_path):
    model = onnx.load(shapes_detector_path())
    for i, node in enumerate(model.graph.node):
        if i % 3 == 0:
            node.name = ""  # as Paddle2ONNX and hand-built graphs leave them
        elif i % 7 == 0:
            node.name = model.graph.node[i - 1].name or "dup"
    path = tmp_path / "renamed.onnx"
    onnx.save(model, str(path))
    ids = viewer_node_ids(model)
    graph = ModelGraph(model)
    shown = _adapter_nodes(path)
    assert len(set(ids.values())) == len(graph.nodes) == 423
    for node in graph.nodes:  # aligner's node -> the viewer's node of the same op and outputs
        assert shown[ids[node.name]] == (node.op_type, list(node.output)), node.name
    # The culprit, unnamed, is the third unnamed node; a node that repeats its neighbour's name gets "_1".
    assert ids["Pow(/stem_norm/Pow_output_0)"] == "node_2" and ids["Transpose(/Transpose_1_output_0)"] == "/stem_norm/Add_1_1"


def _unnamed_model() -> onnx.ModelProto:
    """x*1000 squared overflows FP16 in an unnamed Pow; the other names are markup or repeated."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    nodes = [helper.make_node("Mul", ["x", "k"], ["scaled"], name=HOSTILE),
             helper.make_node("Pow", ["scaled", "two"], ["sq"]),
             helper.make_node("Add", ["sq", "k"], ["a"], name="dup"),
             helper.make_node("Add", ["a", "k"], ["b"], name="dup"),
             helper.make_node("ReduceMean", ["b"], ["y"], keepdims=0)]
    init = [onnx.numpy_helper.from_array(np.array(1000.0, np.float32), "k"), onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    return helper.make_model(helper.make_graph(nodes, "unnamed", [x], [y], init), opset_imports=[helper.make_opsetid("", 16)])


def test_unnamed_culprit_is_keyed_by_the_viewers_id_and_names_are_escaped(tmp_path, capsys):
    path = tmp_path / "unnamed.onnx"
    onnx.save(_unnamed_model(), str(path))
    graph = ModelGraph.load(path)
    feeds = {"x": np.linspace(0.1, 1.0, 64, dtype=np.float32)[None]}
    run_c = write_run(tmp_path / "c", "compare", graph, compare(graph, target="emu:fp16", feeds=feeds).to_dict())
    run_b = write_run(tmp_path / "b", "bisect", graph, bisect(graph, target="emu:fp16", feeds=feeds).to_dict())
    html = tmp_path / "r.html"
    assert main(["report", str(run_c), str(run_b), "-o", str(html), "--graph", str(tmp_path / "g")]) == 0
    first = _results(tmp_path / "g", "first-divergence")
    # aligner calls the Pow "Pow(sq)"; Model Explorer shows it as "node" (the second Add as "dup_1").
    assert first["node"]["bgColor"] == FIRST and {"dup", "dup_1", HOSTILE, "node_1"} <= set(first)
    if HAS_VIEWER:
        assert set(first) <= set(_adapter_nodes(path))
    page = html.read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "%22selectedNodeId%22%3A%20%22node%22" in page  # the culprit's link selects the viewer's id
    out = capsys.readouterr().out
    assert f"--node_data_paths={tmp_path / 'g'}/first-divergence.json," in out and "--extensions=model_explorer_onnx" in out


def test_report_graph_prints_the_command_links_the_culprit_and_never_overwrites(detector_runs, tmp_path, capsys):
    html = tmp_path / "report.html"
    args = ["report", *map(str, detector_runs), "-o", str(html), "--graph"]
    assert main(args) == 0
    out = capsys.readouterr().out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("model-explorer "))
    assert command.startswith(f"model-explorer {shapes_detector_path()} --extensions=model_explorer_onnx --node_data_paths=")
    assert all((tmp_path / "report.graph" / f).exists() for f in ("first-divergence.json", "nan-inf.json", "overlays.json"))
    page = html.read_text()
    assert page.count('class="graph"') >= 3 and "%22selectedNodeId%22%3A%20%22%2Fstem_norm%2FPow%22" in page
    assert main(["report", str(detector_runs[1]), "--graph", str(tmp_path / "report.graph")]) == 2
    assert "not empty" in capsys.readouterr().err and main(["report", str(detector_runs[1])]) == 2
    assert "--graph" in capsys.readouterr().err


def test_view_without_the_extra_names_it_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "model_explorer", None)  # as if the view extra were not installed
    assert main(["view", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'aligner[view]'" in err and "ai-edge-model-explorer" in err


# ---- a real browser -----------------------------------------------------------------------------

class _DevTools:
    """Headless Chromium over --remote-debugging-pipe (the DevTools protocol on fds 3/4; no extra package)."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900):
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()
        keep_r, keep_w = os.dup(to_r), os.dup(from_w)  # above 4, so the child's dup2 cannot clobber them
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe", "--use-angle=swiftshader",
             "--enable-unsafe-swiftshader", f"--window-size={width},{height}", "--hide-scrollbars"],
            preexec_fn=lambda: (os.dup2(keep_r, 3), os.dup2(keep_w, 4)), close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_r, from_w, keep_r, keep_w):
            os.close(fd)
        self._buf, self._id = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if getattr(self, "session", None):
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_view(runs, port: int, graph_dir: Path) -> tuple[subprocess.Popen, str]:
    """``aligner view`` in a subprocess; returns it and the URL it prints once Model Explorer answers."""
    proc = subprocess.Popen([sys.executable, "-m", "aligner.cli.main", "view", *map(str, runs), "--port", str(port), "--no-browser",
                             "--graph", str(graph_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # drains it to the end
    seen, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith(f"http://localhost:{port}/?data=") and "uiState" in line:
            return proc, line.strip()
    proc.kill()
    pytest.fail("aligner view printed no URL:\n" + "".join(seen[-30:]))


@needs_viewer
@needs_chromium
def test_model_explorer_shows_the_culprit_selected_and_coloured(detector_runs, tmp_path):
    port = _free_port()
    server, url = _start_view(detector_runs, port, tmp_path / "graph")
    browser = _DevTools(tmp_path / "profile")
    try:
        browser.send("Page.navigate", {"url": url})
        text, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline:  # the adapter converts, the worker lays out, the four files load
            text = browser.evaluate("document.body.innerText") or ""
            if CULPRIT in text and text.count(".json") >= 4 and "first divergence: Pow" in text and "NaN/inf origin" in text:
                break
            time.sleep(1)
        assert CULPRIT in text, text[:2000]  # the side panel shows the selected node's id...
        for name in ("first-divergence", "accumulated-error", "local-error", "nan-inf"):  # ...and its value in every overlay
            assert name in text, text[:2000]
        assert "first divergence: Pow" in text and "NaN/inf origin" in text
        time.sleep(1)  # let the canvas finish drawing
        canvas = browser.evaluate("JSON.stringify(document.querySelector('canvas').getBoundingClientRect())")
        png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    shot = tmp_path / "model-explorer.png"
    shot.write_bytes(png)
    from PIL import Image

    rect = json.loads(canvas)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    graph = pixels[int(rect["top"]):int(rect["bottom"]), int(rect["left"]):int(rect["right"])]
    rgb = np.array([int(FIRST[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    filled = int((np.abs(graph - rgb).max(axis=2) <= 6).sum())
    # The first-divergence overlay is shown: the selected Pow node is filled red (a box of ~110x36 px).
    assert filled > 1500, f"the culprit is not drawn in {FIRST} on the graph ({filled} px); see {shot}"
    assert server.returncode == 0
