"""PyTorch side: every module call's outputs, captured with forward hooks (torch imported lazily).

Each call is its own record (a module called twice gives two), outputs are flattened from
tensors, tuples/lists, dicts and dataclass-like objects (``ModelOutput``), copied at once so that
later in-place ops cannot change them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from aligner._optional import require
from aligner.errors import InputError


@dataclass(frozen=True)
class ModuleCall:
    path: str  # qualified name ("" for the root module)
    call: int  # 0 for the first call of this module, 1 for the second...
    order: int  # position among all calls, in the order they finished
    type_name: str
    leaf: bool  # the module has no children
    outputs: tuple[np.ndarray, ...] = field(repr=False)
    output_keys: tuple[str, ...] = ()


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    import torch

    if isinstance(value, torch.Tensor):
        return [(prefix or "out", value)]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in _flatten(v, f"{prefix}[{i}]")]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if hasattr(value, "__dataclass_fields__") or hasattr(value, "to_tuple"):  # transformers ModelOutput
        items = value.items() if hasattr(value, "items") else vars(value).items()
        return [x for k, v in items for x in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return []


def capture_module_outputs(model, args: Sequence, device: str = "cpu", dtype: str = "fp32",
                           autocast: bool = False) -> list[ModuleCall]:
    """Run ``model(*args)`` once with hooks on every module; returns each call's outputs (float32 numpy).

    ``dtype`` "fp32" on CUDA turns TF32 off for matmuls and convolutions (PyTorch leaves it on for
    cuDNN convolutions by default); "tf32" turns it on: the choice is explicit, as for ONNX Runtime.
    """
    torch = require("torch", "capturing PyTorch module outputs")
    tf32 = dtype == "tf32"
    dtype = "fp32" if tf32 else dtype
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r}: choose fp32, fp16 or bf16")
    model = model.to(device)
    if not autocast:
        model = model.to(dtypes[dtype])
    names = {id(m): n for n, m in model.named_modules()}
    leaf = {id(m): not any(True for _ in m.children()) for m in model.modules()}
    calls: list[ModuleCall] = []
    seen: dict[str, int] = {}

    def hook(module, _inputs, output):
        path = names.get(id(module), "?")
        items = [(k, v) for k, v in _flatten(output) if v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.bool)]
        outs = tuple(v.detach().float().cpu().numpy().copy() if v.is_floating_point() else v.detach().cpu().numpy().copy()
                     for _, v in items)
        calls.append(ModuleCall(path, seen.get(path, 0), len(calls), type(module).__name__, leaf[id(module)], outs,
                                tuple(k for k, _ in items)))
        seen[path] = seen.get(path, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    cast = lambda a: a.to(device=device, dtype=dtypes[dtype] if not autocast else torch.float32) if a.is_floating_point() else a.to(device)  # noqa: E731
    inputs = [cast(torch.as_tensor(a)) for a in args]
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=dtypes["bf16" if dtype == "bf16" else "fp16"]) if autocast else contextlib.nullcontext()
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.no_grad(), ctx:
            model(*inputs)
    except Exception as exc:  # the user's forward() raised: say so with the shapes given
        shapes = [tuple(a.shape) for a in inputs]
        raise InputError(f"The PyTorch model failed on inputs of shape {shapes}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        for h in handles:
            h.remove()
    return calls


__all__ = ["ModuleCall", "capture_module_outputs"]
