"""Graph core: loading (and its errors), identity of nameless nodes, capture, extraction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import aligner
from aligner.backends import reference_runner
from aligner.errors import InputError, ModelLoadError
from aligner.examples import tiny_vit
from aligner.graph.capture import extract_subgraph
from aligner.graph.model import ModelGraph


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        ModelGraph.load(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README, not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="not (a readable ONNX model|an ONNX model)"):
        ModelGraph.load(path)


def test_truncated(tmp_path, vit_path):
    data = vit_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        ModelGraph.load(path)


def test_checker_failure(tmp_path):
    model = tiny_vit()
    model.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="ONNX checker"):
        ModelGraph.load(path)


def test_external_data_model_runs_and_missing_data_is_named(tmp_path, vit_inputs):
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(tiny_vit(), str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    graph = ModelGraph.load(path)
    out = reference_runner(graph).run(vit_inputs)["logits"]
    expected = reference_runner(ModelGraph(tiny_vit())).run(vit_inputs)["logits"]
    np.testing.assert_array_equal(out, expected)
    (path.parent / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="weights.bin"):
        ModelGraph.load(path)


def test_nameless_nodes_get_stable_names():
    model = tiny_vit()
    for node in model.graph.node:
        node.name = ""
    a, b = ModelGraph(model), ModelGraph(model)
    names = [n.name for n in a.nodes]
    assert names == [n.name for n in b.nodes]
    assert len(set(names)) == len(names)
    assert "Pow(/blocks.0/norm1/Pow_output_0)" in names


def test_topological_order_repairs_shuffled_graph(vit_inputs):
    model = tiny_vit()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    graph = ModelGraph(model)
    seen = set(graph.input_names) | set(graph.initializers)
    for node in graph.nodes:
        assert all(i in seen for i in node.input if i)
        seen.update(node.output)


def test_shapes_and_symbolic_dims_kept():
    graph = ModelGraph(tiny_vit())
    assert graph.tensors["pixels"].shape == ("batch", 3, 64, 64)
    pow_out = graph.tensors["/blocks.0/norm1/Pow_output_0"]
    assert pow_out.shape == ("batch", 64, 48) and pow_out.dtype_name == "float"


def test_extract_subgraph_runs_standalone(vit_inputs):
    graph = ModelGraph(tiny_vit())
    src, dst = "/blocks.0/norm1/Sub_output_0", "/blocks.0/norm1/Sqrt_output_0"
    full = reference_runner(graph).run(vit_inputs, [src, dst])
    sub = ModelGraph(extract_subgraph(graph, [src], [dst]))
    assert sorted(n.op_type for n in sub.nodes) == ["Add", "Pow", "ReduceMean", "Sqrt"]
    out = reference_runner(sub).run({src: full[src]})[dst]
    np.testing.assert_allclose(out, full[dst], rtol=1e-6)


def test_unknown_tensor_lists_close_matches():
    graph = ModelGraph(tiny_vit())
    with pytest.raises(InputError, match="Did you mean.*Pow_output_0"):
        graph.tensor("/blocks.0/norm1/Pow_output")


def test_import_aligner_stays_light():
    import subprocess
    import sys

    code = "import sys, aligner; bad = [m for m in ('torch', 'tensorrt', 'matplotlib', 'pycocotools') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    assert "compare" in aligner.__all__
