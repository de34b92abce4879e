"""The report of an INT8 bisect: each node's own error on the real integer kernels beside the same
node with Q/DQ in float, as a chart and a table, the node to blame named and its name escaped.

The model is test_int8's CNN with the outlier-channel fault (conv2's channel 0 x1000, compensated
in conv3): its quantization error appears in the consumer, conv3, renamed here to carry markup.
"""

from __future__ import annotations

import copy
import html
import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
from test_int8 import CONSUMER, _image, build_cnn_int8

from aligner.cli.main import main
from aligner.report import read_run, render_report
from aligner.report.html import quantization_rows

HOSTILE = f"{CONSUMER}<b>outlier</b>"
ESCAPED = f"{CONSUMER}&lt;b&gt;outlier&lt;/b&gt;"


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """``aligner bisect fault.onnx --target ort:cpu:int8 --calib calib/ --strategy isolate --run run/``."""
    root = tmp_path_factory.mktemp("report_int8")
    model = build_cnn_int8(outlier=True)
    consumer = next(n for n in model.graph.node if n.name == CONSUMER)
    consumer.name = HOSTILE
    onnx.save(model, str(root / "fault.onnx"))
    (root / "calib").mkdir()
    for i in range(8):
        np.savez(root / "calib" / f"{i}.npz", **_image(100 + i))
    np.savez(root / "held_out.npz", **_image(7))
    code = main(["bisect", str(root / "fault.onnx"), "--target", "ort:cpu:int8", "--calib", str(root / "calib"),
                 "--inputs", str(root / "held_out.npz"), "--strategy", "isolate", "--run", str(root / "run")])
    assert code == 1  # diverged
    return root


def _section(html: str) -> str:
    """The INT8 block of the page: from its heading to the end of its table."""
    start = html.index('<div class="int8-errors">')
    return html[start:html.index("</table>", start)]


def _cells(section: str, name: str) -> list[str]:
    row = next(r for r in section.split("<tr")[1:] if f'class="name">{name}' in r)
    return [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def test_int8_report_charts_each_nodes_kernel_and_emulated_error(int8_run, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(int8_run / "run"), "-o", str(page)]) == 0
    text = page.read_text()
    section = _section(text)
    assert "<svg" in section and section.count("<path") > 50  # the chart is drawn
    _, node, op, real, emulated, blame = _cells(section, ESCAPED)
    assert node == HOSTILE and op == "Conv" and float(real) > 0.5 and float(emulated) > 0.5  # both numbers listed
    assert blame == "quantization's"  # large with Q/DQ in float too: quantization's error, not the kernel's
    assert f"<code>{ESCAPED}</code>" in section.split("<div class=\"chart\">")[0]  # named in the verdict above the chart
    listed = re.findall(r'<td class="name">([^<]+?) ?</td>', section)
    assert len(listed) == 9 and listed[0] == ESCAPED  # every isolated node, the worst first (its folded Relu next)
    assert "<b>outlier" not in text  # the name is text, in the table and in the SVG's comments


def test_a_node_the_kernel_loses_is_highlighted(int8_run):
    """On a CPU without VNNI, ORT's u8s8 kernels can lose what Q/DQ in float keeps (16-bit
    accumulation saturates). This machine may have VNNI, so the run's JSON is edited to say so."""
    run = read_run(int8_run / "run")
    result = copy.deepcopy(run.result)
    conv1 = next(e for e in result["local_errors"] if e["node"] == "conv1")
    conv1["metrics"]["rel_l2"], conv1["diverges"] = 0.4, True  # emulated_rel_l2 stays ~0.01
    assert {r["node"]: r["blame"] for r in quantization_rows(result)}["conv1"] == "kernel"
    section = _section(render_report([replace(run, result=result)]))
    assert '<tr class="blame-kernel">' in section and "lose accuracy in the integer kernel" in section
    assert "<code>conv1</code>" in section  # named in the verdict
    unedited = _section(render_report([run]))
    assert section.count("fill: #d62728") > unedited.count("fill: #d62728")  # its bar and label in the kernel's colour


def test_no_int8_section_without_emulated_errors(int8_run):
    run = read_run(int8_run / "run")
    result = copy.deepcopy(run.result)
    for e in result["local_errors"]:
        del e["metrics"]["emulated_rel_l2"]  # what an FP16 or emu:int8 bisect records
    assert quantization_rows(result) == []
    assert "int8-errors" not in render_report([replace(run, result=result)])
