"""ONNX Runtime side of the plugins: each plugin's NumPy reference as a CPU custom op.

The custom ops are onnxruntime-extensions Python ops (domain ``ai.onnx.contrib``), which take
one fixed type per input: FP32 for ``T``. :func:`adapt_for_ort` therefore rewrites a model's
plugin nodes for the session only — domain ``aligner`` to ``ai.onnx.contrib``, a Cast to FP32 on
each ``T`` input and a Cast back to the node's own type on each output — so a plugin node in an
FP16 model reads FP16-rounded inputs, computes in FP32 and stores FP16, which is exactly what
the emulator models and what the TensorRT kernels do. Tensor names are unchanged (capture works).
On the CUDA provider the op runs on the CPU with ONNX Runtime's copies around it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from aligner.errors import MissingDependencyError
from aligner.plugin import DOMAIN, PluginSpec, has_plugins, plugins, spec_of

ORT_DOMAIN = "ai.onnx.contrib"
_REGISTERED: set[str] = set()


def _ext():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime-extensions", "plugins", "Running aligner plugin ops on ONNX Runtime") from exc
    return onnxruntime_extensions


def register_ort_ops() -> str:
    """Register every plugin's reference as an onnxruntime-extensions op; the library path to load."""
    ext = _ext()
    d = ext.PyCustomOpDef
    kinds = {"T": d.dt_float, "tensor(float)": d.dt_float, "tensor(bool)": d.dt_bool, "tensor(int64)": d.dt_int64, "tensor(int32)": d.dt_int32}
    attr_kinds = {int: d.dt_int64, float: d.dt_float, str: d.dt_string}
    for spec in plugins().values():
        if spec.name in _REGISTERED:
            continue
        ext.onnx_op(op_type=spec.name, inputs=[kinds[p.type] for p in spec.inputs],
                    outputs=[kinds[p.type] for p in spec.outputs],
                    attrs={k: attr_kinds[type(v)] for k, v in spec.attributes.items()})(_body(spec))
        _REGISTERED.add(spec.name)
    return ext.get_library_path()


_ERRORS: list[str] = []


def take_errors() -> list[str]:
    """Errors raised inside plugin references since the last call (the runner turns them into a
    TargetRunError: an exception must not cross into ONNX Runtime, where it ends the process)."""
    errors = list(_ERRORS)
    _ERRORS.clear()
    return errors


def _body(spec: PluginSpec):
    def run(*arrays, **attrs):
        try:
            return _run(*arrays, **attrs)
        except Exception as exc:  # noqa: BLE001 - reported by the runner after the session returns
            _ERRORS.append(f"{spec.name}: {type(exc).__name__}: {exc}")
            values = {**spec.attributes, **attrs}
            shapes = spec.shape([tuple(a.shape) for a in arrays], values)
            outs = [np.full([d if isinstance(d, int) else 0 for d in (shape or ())], np.nan, np.float32) for shape in shapes]
            return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(*arrays, **attrs):
        outs = spec.run_reference(*arrays, **attrs)
        fixed = [np.ascontiguousarray(o, dtype=np.float32 if p.type in ("T", "tensor(float)") else None) for o, p in zip(outs, spec.outputs)]
        return fixed[0] if len(fixed) == 1 else tuple(fixed)

    run.__name__ = spec.name
    return run


def adapt_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose plugin nodes run as the registered custom ops (see the module doc)."""
    if not has_plugins(model):
        return model
    from aligner.graph.model import infer_shapes

    inferred = infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in model.graph.node:
        spec = spec_of(node)
        if spec is None:
            nodes.append(node)
            continue
        values = spec.attrs_of(node)
        new = helper.make_node(spec.name, [], [], name=node.name, domain=ORT_DOMAIN, **values)
        low = 0
        for port, name in zip(spec.inputs, node.input):
            if port.type == "T" and name:
                low = low or types.get(name, TensorProto.FLOAT)
                nodes.append(helper.make_node("Cast", [name], [f"{node.name}/{port.name}__aligner_fp32"], to=TensorProto.FLOAT))
                new.input.append(f"{node.name}/{port.name}__aligner_fp32")
            else:
                new.input.append(name)
        nodes.append(new)
        for port, name in zip(spec.outputs, node.output):
            if port.type == "T" and low and low != TensorProto.FLOAT:
                new.output.append(f"{name}__aligner_fp32")
                nodes.append(helper.make_node("Cast", [f"{name}__aligner_fp32"], [name], to=low))
            else:
                new.output.append(name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.value_info[:]
    kept = [o for o in out.opset_import if o.domain not in (DOMAIN, ORT_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(kept + [helper.make_opsetid(ORT_DOMAIN, 1)])
    return out


def for_session(model: onnx.ModelProto, options) -> tuple[onnx.ModelProto, bool]:
    """(the model to give ONNX Runtime, whether it has plugin ops): with plugin ops, the custom-op
    library is registered in ``options`` and the plugin nodes adapted; otherwise unchanged."""
    if not has_plugins(model):
        return model, False
    options.register_custom_ops_library(register_ort_ops())
    return adapt_for_ort(model), True


__all__ = ["ORT_DOMAIN", "adapt_for_ort", "for_session", "register_ort_ops", "take_errors"]
