"""Cases of the consistency suite (issue 15): real architectures x targets x faults whose location is known.

A case is one question, asked of every command: a model (and optionally an edited copy of it, the
``--target-model``), its inputs, a target. Where the fault's location is known, the case says which
node a user should act on and what kind of root cause it is. Models are built once per session by a
:class:`Library`; the fault injectors edit copies of them (``faults.py``'s editors where they fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.backends import reference_runner
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs
from conftest import _export, build_cnn, build_deep_mlp, export_detr
from aligner.examples.faults import edit_constant, inject_overflow_site

FP16_MAX = float(np.finfo(np.float16).max)

# The tiny ViT reads raw pixels; the attention key of its second block is the edited weight.
VIT_KEY = "/blocks.1/attn/k/MatMul"
# DETR's decoder self-attention in layer 0 reads constant values (its queries start at zero), so a
# wrong score scale changes the softmax and nothing after it: the masked divergence.
DETR_SCALE = "/detr/model/decoder/layers.0/self_attn/Mul"
DETECTOR_POW = "/stem_norm/Pow"
CNN_CONV = "/layer2/conv1/Conv"
JAX_DENSE = "dense_1/MatMul"


@dataclass(frozen=True)
class Case:
    """One question: ``arch`` on ``target`` (with the ``fault`` applied), and the known answer.

    ``fault``: ``none`` (benign target), ``local`` (one weight scaled, compared as an edited copy),
    ``masked`` (an intermediate diverges, the outputs stay within tolerance), ``inherited`` (error
    builds up with no single bad node), ``overflow`` (a node writes values beyond FP16's max),
    ``same-file`` (the model as its own ``--target-model``).
    ``culprit``: the node a user should act on (first divergent node and root cause), if known.
    ``kind``: the root cause kind all/auto/isolate should report, if known.
    ``diverges``: the expected verdict, if known.
    """

    arch: str
    target: str
    fault: str
    two_model: bool = False
    culprit: str | None = None
    kind: str | None = None
    diverges: bool | None = None

    @property
    def id(self) -> str:
        base, _, options = self.target.partition("@")
        target = f"model2-{base.split(':')[-1]}" if self.two_model else base.replace(":", "_")
        return f"{self.arch}-{target}{'-as-written' if options else ''}-{self.fault}"


@dataclass(frozen=True)
class Question:
    """What every command is given: the model, the optional edited copy, the inputs, the target."""

    model: Path
    target_model: Path | None
    feeds: dict[str, np.ndarray]
    target: str

    def kwargs(self) -> dict:
        return dict(model=self.model, target=self.target, target_model=self.target_model, feeds=self.feeds)

    def argv(self, feeds_path: Path) -> list[str]:
        """The same question on the command line."""
        argv = [str(self.model), "--target", self.target, "--inputs", str(feeds_path)]
        return argv + (["--target-model", str(self.target_model)] if self.target_model is not None else [])


# ONNX Runtime CPU deploys most of an FP16 graph in FP32 (it has no FP16 kernels for them), so on
# plain ort:cpu:fp16 only the few tensors of its deployed graph are compared (capture=boundaries) and
# a mid-graph fault is seen where it reaches them. The rewrite as written — optimizer off, every
# tensor captured — is where a known culprit can be named on ONNX Runtime.
ORT_AS_WRITTEN = "ort:cpu:fp16@capture=all,graph_optimization_level=disable_all"

CASES = [
    # the shipped example detector on its own val image (raw 0-255 pixels): the stem LayerNorm's Pow
    # overflows FP16; the detections move ~1e-3 (masked at the outputs), an intermediate is inf
    Case("detector", "emu:fp16", "masked", culprit=DETECTOR_POW, kind="nonfinite", diverges=True),
    # the tiny ViT on raw pixels: its first LayerNorm overflows FP16
    Case("vit", "emu:fp16", "overflow", culprit="/blocks.0/norm1/Pow", kind="nonfinite", diverges=True),
    Case("vit", "emu:bf16", "none", diverges=False),
    Case("vit", "ort:cpu:fp16", "same-file", two_model=True),
    Case("vit", "ort:cpu:fp32", "local", two_model=True, culprit=VIT_KEY, kind="local", diverges=True),
    # DETR (transformers, random weights, legacy export)
    Case("detr", "emu:fp16", "none", diverges=False),
    Case("detr", "ort:cpu:fp32", "masked", two_model=True, culprit=DETR_SCALE, kind="local", diverges=True),
    # a ResNet-style CNN
    Case("cnn", "emu:fp16", "overflow", culprit=CNN_CONV, kind="nonfinite", diverges=True),
    Case("cnn", "emu:bf16", "none", diverges=False),
    Case("cnn", ORT_AS_WRITTEN, "overflow", culprit=CNN_CONV, kind="nonfinite", diverges=True),
    Case("cnn", "ort:cpu:fp16", "overflow", diverges=True),  # deployed: the outputs diverge; every command agrees where
    Case("cnn", "ort:cpu:fp32", "local", two_model=True, culprit=CNN_CONV, kind="local", diverges=True),
    Case("cnn", ORT_AS_WRITTEN, "local", two_model=True, culprit=CNN_CONV, kind="local", diverges=True),
    # a deep tanh MLP in the chaotic regime: low-precision rounding error grows layer by layer
    Case("mlp", "emu:fp16", "inherited", kind="inherited", diverges=True),
    Case("mlp", "emu:bf16", "inherited", kind="inherited", diverges=True),
    Case("mlp", "ort:cpu:fp16", "inherited", kind="inherited", diverges=True),
    # a JAX-style classifier (plain MatMul/Add/Relu, confident softmax)
    Case("jax", "emu:fp16", "none", diverges=False),
    Case("jax", "ort:cpu:fp32", "masked", two_model=True, culprit=JAX_DENSE, kind="local", diverges=True),
    Case("jax", ORT_AS_WRITTEN, "masked", two_model=True, culprit=JAX_DENSE, kind="local", diverges=True),
]


# ---- architectures ---------------------------------------------------------------------------

def detector(directory: Path) -> tuple[Path, dict]:
    """The shipped example detector and the first val image (of the demo's 50) whose stem LayerNorm
    overflows FP16, fed as the demo feeds it: raw 0-255 pixels."""
    from aligner.eval.dataset import CocoDataset
    from aligner.examples import shapes_detector_path, shapes_preprocess, shapes_val

    path = shapes_detector_path()
    images, _, _ = next(CocoDataset(*shapes_val()).batches(shapes_preprocess(), 50))
    graph = ModelGraph.load(path)
    pow_out = graph.node(DETECTOR_POW).output[0]
    peaks = np.abs(reference_runner(graph).run({"pixels": images}, [pow_out])[pow_out]).reshape(len(images), -1).max(axis=1)
    first = int(np.argmax(peaks > FP16_MAX))
    assert peaks[first] > FP16_MAX, "no val image overflows the stem LayerNorm in FP16"
    return path, {"pixels": images[first:first + 1]}


def vit(directory: Path) -> tuple[Path, dict]:
    from aligner.examples import example_inputs, tiny_vit

    path = directory / "tiny_vit.onnx"
    onnx.save(tiny_vit(), str(path))
    return path, {"pixels": example_inputs()["pixels"][:1]}


def detr(directory: Path) -> tuple[Path, dict]:
    path = export_detr("legacy", directory)
    return path, make_inputs(ModelGraph.load(path))


def cnn(directory: Path) -> tuple[Path, dict]:
    import torch

    path = _export(build_cnn(), (torch.randn(1, 3, 32, 32),), directory / "cnn.onnx", dynamo=False)
    return path, make_inputs(ModelGraph.load(path))


def mlp(directory: Path) -> tuple[Path, dict]:
    import torch

    path = _export(build_deep_mlp(), (torch.randn(1, 64),), directory / "mlp.onnx", dynamo=False)
    return path, make_inputs(ModelGraph.load(path))


def jax_classifier(directory: Path, width: int = 64, classes: int = 10, depth: int = 4) -> tuple[Path, dict]:
    """A classifier as jax2onnx/tf2onnx write it: ``dense_i/MatMul`` + ``dense_i/Add`` (+ Relu) and a
    softmax; trained-like confident logits (the top class wins by a wide margin)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(depth):
        fan_out = classes if i == depth - 1 else width
        gain = 12.0 if i == depth - 1 else 2.0**0.5
        w = (rng.standard_normal((width, fan_out)) * gain / width**0.5).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"dense_{i}/kernel"), numpy_helper.from_array(b, f"dense_{i}/bias")]
        nodes.append(helper.make_node("MatMul", [x, f"dense_{i}/kernel"], [f"dense_{i}/MatMul:0"], name=f"dense_{i}/MatMul"))
        nodes.append(helper.make_node("Add", [f"dense_{i}/MatMul:0", f"dense_{i}/bias"], [f"dense_{i}/Add:0"], name=f"dense_{i}/Add"))
        x = f"dense_{i}/Add:0"
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [x], [f"dense_{i}/Relu:0"], name=f"dense_{i}/Relu"))
            x = f"dense_{i}/Relu:0"
    nodes.append(helper.make_node("Softmax", [x], ["probs"], name="softmax/Softmax", axis=-1))
    graph = helper.make_graph(nodes, "jax_classifier", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="jax2onnx-like")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / "jax_classifier.onnx"
    onnx.save(model, str(path))
    return path, {"input": np.random.default_rng(1).standard_normal((1, width)).astype(np.float32)}


ARCHITECTURES = {"detector": detector, "vit": vit, "detr": detr, "cnn": cnn, "mlp": mlp, "jax": jax_classifier}


# ---- faults ----------------------------------------------------------------------------------

def scale_node_weight(path: Path, out: Path, node: str, factor: float) -> Path:
    """A copy with the weight (input 1: initializer or Constant) of ``node`` multiplied by ``factor``."""
    return edit_constant(path, out, node, 1, lambda w: w * np.float32(factor))


def overflow_conv(path: Path, out: Path, node: str, undo: str) -> Path:
    """A copy whose ``node`` (a Conv) writes values 4x beyond FP16's max, undone in ``undo`` (the
    Conv after the ReLU), so FP32 computes the same outputs and FP16 overflows between the two."""
    graph = ModelGraph.load(path)
    inject_overflow_site(graph, node, undo, make_inputs(graph))
    onnx.save(graph.model, str(out))
    return out


# (arch, fault) -> how the edited copy is made: (source, out) -> path
EDITS = {
    ("vit", "local"): lambda p, o: scale_node_weight(p, o, VIT_KEY, 1.05),
    ("detr", "masked"): lambda p, o: scale_node_weight(p, o, DETR_SCALE, 1.5),
    ("cnn", "overflow"): lambda p, o: overflow_conv(p, o, CNN_CONV, "/layer2/conv2/Conv"),
    ("cnn", "local"): lambda p, o: scale_node_weight(p, o, CNN_CONV, 1.05),
    ("jax", "masked"): lambda p, o: scale_node_weight(p, o, JAX_DENSE, 1.05),
}


class Library:
    """Builds each architecture once and each edited copy once, under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._models: dict[str, tuple[Path, dict]] = {}
        self._edits: dict[tuple[str, str], Path] = {}

    def model(self, arch: str) -> tuple[Path, dict]:
        if arch not in self._models:
            folder = self.directory / arch
            folder.mkdir(exist_ok=True)
            self._models[arch] = ARCHITECTURES[arch](folder)
        return self._models[arch]

    def edited(self, arch: str, fault: str) -> Path:
        if (arch, fault) not in self._edits:
            source, _ = self.model(arch)
            self._edits[arch, fault] = EDITS[arch, fault](source, self.directory / arch / f"{fault}.onnx")
        return self._edits[arch, fault]

    def question(self, case: Case) -> Question:
        path, feeds = self.model(case.arch)
        if case.two_model:  # the original on the reference vs the copy on the target
            other = path if case.fault == "same-file" else self.edited(case.arch, case.fault)
            return Question(path, other, feeds, case.target)
        if (case.arch, case.fault) in EDITS:  # a faulty model on a low-precision target
            return Question(self.edited(case.arch, case.fault), None, feeds, case.target)
        return Question(path, None, feeds, case.target)
