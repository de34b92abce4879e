"""Plugins: one definition per custom op, serving ONNX, ONNX Runtime, TensorRT and the passes.

A plugin is a folder under the top-level ``plugins/`` (installed as the package
``aligner_plugins``) whose ``SPEC`` is a :class:`PluginSpec`: the op's domain, name, inputs with
their types, attributes with defaults, the output shape rule and a NumPy reference
implementation. From that one definition aligner derives

* the ONNX schema (registered with ``onnx.defs``), so the checker validates plugin nodes, shape
  inference types their outputs, and the precision rewrite and the FP16 emulator read which
  inputs follow the low type and which stay FP32 exactly as they do for standard ops;
* the ONNX Runtime custom op (:mod:`aligner.plugin.ort`): the reference run through
  onnxruntime-extensions on the CPU, which is what backs the emulator and every ``ort:`` target;
* the TensorRT plugin (:mod:`aligner.plugin.trt`): an ``IPluginV3`` whose ``enqueue`` runs the
  folder's GPU kernel, registered under the namespace ``aligner``.

Plugin nodes carry ``plugin_namespace="aligner"`` and ``plugin_version`` so that TensorRT's ONNX
parser finds the creator by name; the schema declares both as optional attributes.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import defs

from aligner.errors import InputError, close_matches

DOMAIN = "aligner"
TRT_NAMESPACE = "aligner"
FLOAT_T = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")


@dataclass(frozen=True)
class Port:
    """One input or output: ``T`` follows the model's float precision; any other type is fixed."""

    name: str
    type: str  # "T" or an ONNX type string such as "tensor(bool)", "tensor(int64)", "tensor(float)"
    doc: str = ""


@dataclass(frozen=True)
class PluginSpec:
    name: str  # the op type, and the TensorRT plugin name
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: dict[str, int | float | str]  # name -> default (its Python type is the attribute type)
    shape: Callable[[list[tuple | None], dict], list[tuple | None]]  # input shapes, attributes -> output shapes
    reference: Callable[..., np.ndarray | tuple[np.ndarray, ...]]  # NumPy, FP32 arithmetic
    kernel: str = ""  # "module:function" of the GPU implementation (Triton), run by the TensorRT plugin
    fusion: str = ""  # the --fuse pass that inserts it
    replaces: str = ""  # what the pass replaces, for `aligner plugins list`
    version: int = 1
    folder: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{DOMAIN}::{self.name}"

    def attrs_of(self, node: onnx.NodeProto) -> dict:
        """The node's attributes over the defaults, typed as the spec declares them."""
        values = dict(self.attributes)
        for a in node.attribute:
            if a.name in self.attributes:
                values[a.name] = onnx.helper.get_attribute_value(a)
                if isinstance(values[a.name], bytes):
                    values[a.name] = values[a.name].decode()
        return values

    def make_node(self, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> onnx.NodeProto:
        unknown = set(attrs) - set(self.attributes)
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        return onnx.helper.make_node(self.name, list(inputs), list(outputs), name=name, domain=DOMAIN,
                                     plugin_namespace=TRT_NAMESPACE, plugin_version=str(self.version), **attrs)

    def run_reference(self, *arrays: np.ndarray, **attrs) -> tuple[np.ndarray, ...]:
        values = {**self.attributes, **attrs}
        out = self.reference(*arrays, **values)
        return out if isinstance(out, tuple) else (out,)


_REGISTRY: dict[str, PluginSpec] = {}


def plugins() -> dict[str, PluginSpec]:
    """Every plugin of ``aligner_plugins`` by op name (loaded, and its ONNX schema registered, once)."""
    if not _REGISTRY:
        aligner_plugins = _plugin_package()
        for info in pkgutil.iter_modules(aligner_plugins.__path__):
            module = importlib.import_module(f"aligner_plugins.{info.name}")
            spec = getattr(module, "SPEC", None)
            if isinstance(spec, PluginSpec):
                spec = PluginSpec(**{**spec.__dict__, "folder": info.name})
                _REGISTRY[spec.name] = spec
                _register_schema(spec)
    return _REGISTRY


def register_schemas(model: onnx.ModelProto) -> None:
    """Register the plugin ops' ONNX schemas (once) if ``model`` uses the plugin domain, so that the
    ONNX checker and shape inference know its plugin nodes. Nothing is registered at import time."""
    if has_plugins(model) or any(o.domain == DOMAIN for o in model.opset_import):
        plugins()


def _plugin_package():
    """``aligner_plugins``: installed with aligner (pyproject.toml maps it to the top-level ``plugins/``).

    One exception, for a source checkout used without installing it (``PYTHONPATH=.``, as on the GPU
    machine, which has no package index): there the package is the ``plugins/`` folder of that
    checkout, taken only when aligner itself was imported from a checkout (its pyproject.toml beside).
    """
    import sys
    from pathlib import Path

    try:
        import aligner_plugins
    except ImportError:
        checkout = Path(__file__).resolve().parents[2]
        folder = checkout / "plugins"
        if not ((checkout / "pyproject.toml").is_file() and (folder / "__init__.py").is_file()):
            raise InputError("The plugin package aligner_plugins is not installed; reinstall aligner (pip install aligner, "
                             "or pip install -e . in a checkout).") from None
        spec = importlib.util.spec_from_file_location("aligner_plugins", folder / "__init__.py", submodule_search_locations=[str(folder)])
        aligner_plugins = importlib.util.module_from_spec(spec)
        sys.modules["aligner_plugins"] = aligner_plugins
        spec.loader.exec_module(aligner_plugins)
    return aligner_plugins


def get(name: str) -> PluginSpec:
    table = plugins()
    if name not in table:
        close = close_matches(name, table)
        raise InputError(f"Unknown plugin {name!r}; aligner defines: {', '.join(table)}." + (f" Did you mean: {', '.join(close)}?" if close else ""))
    return table[name]


def spec_of(node: onnx.NodeProto) -> PluginSpec | None:
    """The plugin a node is an instance of (domain ``aligner``), else None."""
    return plugins().get(node.op_type) if node.domain == DOMAIN else None


def has_plugins(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def _register_schema(spec: PluginSpec) -> None:
    if defs.has(spec.name, DOMAIN):
        return
    formal = defs.OpSchema.FormalParameter
    attributes = [defs.OpSchema.Attribute(k, onnx.helper.make_attribute(k, v), f"default {v!r}") for k, v in spec.attributes.items()]
    attributes += [defs.OpSchema.Attribute(k, defs.OpSchema.AttrType.STRING, "TensorRT plugin lookup", required=False)
                   for k in ("plugin_namespace", "plugin_version")]
    schema = defs.OpSchema(
        spec.name, DOMAIN, spec.version, doc=spec.doc,
        inputs=[formal(p.name, p.type, p.doc) for p in spec.inputs],
        outputs=[formal(p.name, p.type, p.doc) for p in spec.outputs],
        type_constraints=[("T", list(FLOAT_T), "float tensors; the plugin computes in FP32")],
        attributes=attributes,
    )
    schema.set_type_and_shape_inference_function(lambda ctx: _infer(spec, ctx))
    defs.register_schema(schema)


_ELEM = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(bool)": onnx.TensorProto.BOOL, "tensor(int64)": onnx.TensorProto.INT64,
         "tensor(int32)": onnx.TensorProto.INT32, "tensor(float16)": onnx.TensorProto.FLOAT16}


def _infer(spec: PluginSpec, ctx) -> None:
    shapes, elem_t = [], 0
    for i, port in enumerate(spec.inputs):
        t = ctx.get_input_type(i) if i < ctx.get_num_inputs() and ctx.has_input(i) else None
        tensor = t.tensor_type if t is not None and t.HasField("tensor_type") else None
        if port.type == "T" and tensor is not None and not elem_t:
            elem_t = tensor.elem_type
        if tensor is None or not tensor.HasField("shape"):
            shapes.append(None)
        else:
            shapes.append(tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim))
    values = dict(spec.attributes)
    for name in spec.attributes:
        attr = ctx.get_attribute(name)
        if attr is not None:
            values[name] = onnx.helper.get_attribute_value(attr)
    out_shapes = spec.shape(shapes, values)
    for j, port in enumerate(spec.outputs):
        elem = elem_t if port.type == "T" else _ELEM[port.type]
        if not elem:
            continue
        shape = out_shapes[j] if j < len(out_shapes) else None
        ctx.set_output_type(j, onnx.helper.make_tensor_type_proto(elem, None if shape is None else list(shape)))


__all__ = ["DOMAIN", "TRT_NAMESPACE", "PluginSpec", "Port", "get", "has_plugins", "plugins", "register_schemas", "spec_of"]
