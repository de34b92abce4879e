"""TensorRT side of the plugins: one generic ``IPluginV3`` driven by each plugin's spec.

Why an ``IPluginV3`` written in Python rather than ``tensorrt.plugin`` (TensorRT 10.7+ "quickly
deployable plugins"): the same class loads into ``tensorrt`` 10.x/11.x and into ``tensorrt_rtx``,
whose bindings have ``IPluginV3`` but no ``tensorrt.plugin`` module — and TensorRT-RTX is the only
TensorRT that builds on the machines of this project. ``tensorrt.plugin`` generates exactly this
kind of object underneath. The spec supplies names, fields, output types and shapes; ``enqueue``
wraps TensorRT's device pointers as torch tensors and launches the folder's Triton kernel on
TensorRT's stream. Like every Python plugin, the engine needs this process's Python to run: for
C++ deployment the kernel would be compiled ahead of time (the AOT path of ``tensorrt.plugin``).

Creators are registered under the namespace ``aligner``; TensorRT's ONNX parser finds them by the
node's op type, ``plugin_version`` and ``plugin_namespace`` attributes (the passes write both).
"""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np

from aligner.plugin import TRT_NAMESPACE, PluginSpec, plugins

log = logging.getLogger(__name__)
_REGISTERED: dict[int, list] = {}  # id(trt module) -> creators kept alive


def _field_type(trt, value):
    if isinstance(value, str):
        return trt.PluginFieldType.CHAR
    return trt.PluginFieldType.INT32 if isinstance(value, int) else trt.PluginFieldType.FLOAT32


def _field_array(value):
    if isinstance(value, str):
        return np.frombuffer(value.encode(), dtype=np.int8)
    return np.array([value], dtype=np.int32 if isinstance(value, int) else np.float32)


def _read_fields(spec: PluginSpec, fields) -> dict:
    values = dict(spec.attributes)
    for f in fields or []:
        if f.name not in spec.attributes:
            continue
        default = spec.attributes[f.name]
        data = np.asarray(f.data)
        if isinstance(default, str):
            values[f.name] = bytes(data.astype(np.int8).tobytes()).decode().rstrip("\x00")
        else:
            values[f.name] = type(default)(data.ravel()[0])
    return values


def _guard(method):
    """TensorRT calls plugin methods from C++, where a Python exception ends the process without
    a word: log the traceback first (naming the plugin and the method), then re-raise.
    ``ALIGNER_PLUGIN_TRACE=1`` also logs every call (which method TensorRT reached last)."""
    import functools

    trace = bool(os.environ.get("ALIGNER_PLUGIN_TRACE"))

    @functools.wraps(method)
    def wrapper(self, *args):
        owner = getattr(self, "plugin_name", getattr(self, "name", "?"))
        if trace:
            log.warning("aligner plugin %s.%s%.200r", owner, method.__name__, args)
        try:
            return method(self, *args)
        except BaseException:
            log.exception("aligner plugin %s.%s failed", owner, method.__name__)
            raise

    return wrapper


def plugin_classes(trt, spec: PluginSpec):
    """(plugin class, creator class) for ``spec`` against the ``trt`` module given."""
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF} | ({trt.DataType.BF16} if hasattr(trt.DataType, "BF16") else set())
    fixed = {"tensor(float)": trt.DataType.FLOAT, "tensor(bool)": trt.DataType.BOOL, "tensor(int64)": trt.DataType.INT64,
             "tensor(int32)": trt.DataType.INT32}

    class SpecPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, values: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = spec.name, str(spec.version), TRT_NAMESPACE
            self.num_outputs = len(spec.outputs)
            self.values = dict(values or spec.attributes)

        @_guard
        def get_capability_interface(self, type):
            return self

        @_guard
        def clone(self):
            return SpecPlugin(self.values)

        @_guard
        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([trt.PluginField(k, _field_array(v), _field_type(trt, v)) for k, v in self.values.items()])

        @_guard
        def get_output_data_types(self, input_types):
            t = next((input_types[i] for i, p in enumerate(spec.inputs) if p.type == "T"), trt.DataType.FLOAT)
            return [t if p.type == "T" else fixed[p.type] for p in spec.outputs]

        @_guard
        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = [tuple(d.get_constant_value() if d.is_constant() else f"d{i}_{j}" for j, d in enumerate(x)) for i, x in enumerate(inputs)]
            exprs = {f"d{i}_{j}": d for i, x in enumerate(inputs) for j, d in enumerate(x)}
            out = []
            for shape in spec.shape(list(shapes), self.values):
                dims = trt.DimsExprs(len(shape))
                for j, d in enumerate(shape):
                    dims[j] = exprs[d] if isinstance(d, str) else expr_builder.constant(int(d))
                out.append(dims)
            return out

        @_guard
        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            port = spec.inputs[pos] if pos < num_inputs else spec.outputs[pos - num_inputs]
            if port.type != "T":
                return desc.type == fixed[port.type]
            first_t = next(i for i, p in enumerate(spec.inputs) if p.type == "T")
            return desc.type in float_types and (pos == first_t or desc.type == in_out[first_t].desc.type)

        @_guard
        def configure_plugin(self, inp, out):
            pass

        @_guard
        def on_shape_change(self, inp, out):
            pass

        @_guard
        def get_valid_tactics(self):
            return []

        @_guard
        def set_tactic(self, tactic):
            pass

        @_guard
        def attach_to_context(self, context):
            return self.clone()

        @_guard
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            module, function = spec.kernel.split(":")
            kernel = getattr(importlib.import_module(module), function)
            ins = [_device_tensor(trt, torch, p, d) for p, d in zip(inputs, input_desc)]
            outs = [_device_tensor(trt, torch, p, d) for p, d in zip(outputs, output_desc)]
            kernel(ins, outs, self.values, torch.cuda.ExternalStream(stream))

    class SpecCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = spec.name, str(spec.version), TRT_NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(k, np.array([], dtype=np.int8 if isinstance(v, str) else np.int32 if isinstance(v, int) else np.float32),
                                 _field_type(trt, v)) for k, v in spec.attributes.items()])

        @_guard
        def create_plugin(self, name, fields, phase):
            return SpecPlugin(_read_fields(spec, fields))

    return SpecPlugin, SpecCreator


def _device_tensor(trt, torch, pointer: int, desc):
    """A torch view of TensorRT's device buffer (no copy)."""
    dtype = np.dtype(trt.nptype(desc.type))
    shape = tuple(int(d) for d in desc.dims)

    class _View:
        __cuda_array_interface__ = {"shape": shape, "typestr": dtype.str, "data": (int(pointer), False), "version": 2}

    return torch.as_tensor(_View(), device="cuda")


def register_trt_plugins(trt) -> list[str]:
    """Register a creator for every plugin with ``trt``'s plugin registry (once); their ids."""
    if id(trt) not in _REGISTERED:
        registries = [trt.get_plugin_registry()]
        if hasattr(trt, "get_builder_plugin_registry"):  # where the ONNX parser of TensorRT 10+/RTX looks when building
            registries.append(trt.get_builder_plugin_registry(trt.EngineCapability.STANDARD))
        creators = []
        for spec in plugins().values():
            _, creator_class = plugin_classes(trt, spec)
            creator = creator_class()
            for registry in registries:
                registry.register_creator(creator, TRT_NAMESPACE)
            creators.append(creator)
        _REGISTERED[id(trt)] = creators
    return [f"{TRT_NAMESPACE}::{c.name}" for c in _REGISTERED[id(trt)]]


__all__ = ["plugin_classes", "register_trt_plugins"]
