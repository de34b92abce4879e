"""PyTorch: the ``torch:*`` runner, and every module call's outputs for ``compare_torch`` (torch
imported lazily).

:class:`TorchRunner` runs an ``nn.Module`` eagerly on ``torch:cpu:fp32`` or
``torch:cuda:fp32|tf32|fp16|bf16|autocast`` through the Runner protocol: feeds by the ONNX input
names (in order), outputs by the ONNX output names, any named submodule capturable (its first
call's first tensor output), timed with CUDA synchronisation. TF32 is explicit (on only for tf32).
Runtime options: :data:`TORCH_OPTIONS`.

:func:`capture_module_outputs` records each call (a module called twice gives two); outputs are
flattened from tensors, tuples/lists, dicts and dataclass-like objects (``ModelOutput``), copied at
once so that later in-place ops cannot change them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from aligner._optional import require
from aligner.backends.base import InputInfo, check_capture, check_options, choice_option, time_runs
from aligner.backends.target import Target
from aligner.errors import InputError, TargetError, TargetRunError

TORCH_OPTIONS = {
    "cudnn_benchmark": "0|1: cuDNN's autotuner picks the convolution algorithms (torch.backends.cudnn.benchmark)",
    "channels_last": "0|1: the module and 4-D inputs in channels-last memory format",
}


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


class TorchRunner:
    """``module`` on a ``torch:*`` target; ``input_names`` map feeds to its positional arguments,
    ``output_names`` name its flattened outputs (else their keys: ``out``, ``[0]``, ``logits``...)."""

    def __init__(self, module, target: Target, input_names: Sequence[str], output_names: Sequence[str] = (),
                 inputs: Sequence[InputInfo] = ()):
        torch = require("torch", f"Target {target}")
        if target.pins:
            raise TargetError(f"Target {target}: PyTorch eager cannot keep single ONNX nodes in FP32; drop the pins "
                              "(or compare the ONNX model with the plan on ort:* / emu:*).")
        options = check_options(target, TORCH_OPTIONS)
        self.options = {k: choice_option(target, k, v, ("0", "1")) == "1" for k, v in options.items()}
        if target.device == "cuda" and not torch.cuda.is_available():
            raise TargetError(f"Target {target} needs a CUDA build of PyTorch and a GPU; torch {torch.__version__} sees none.")
        self.target, self.label = target, str(target)
        self.input_names, self.output_names = list(input_names), list(output_names)
        self._inputs = tuple(inputs)
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(target.precision, torch.float32)
        self.module = copy.deepcopy(module).eval().to(device=target.device, dtype=self._dtype)
        if self.options.get("channels_last"):
            self.module = self.module.to(memory_format=torch.channels_last)
        self._modules = {name: m for name, m in self.module.named_modules() if name}
        self.capturable = frozenset(set(self._modules) | set(self.input_names) | set(self.output_names))

    def _tensors(self, feeds: dict[str, np.ndarray]) -> list:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.label}: no value for input(s) {missing}; the inputs are {self.input_names}.")
        out = []
        for name in self.input_names:
            t = torch.as_tensor(np.ascontiguousarray(feeds[name])).to(self.target.device)
            if t.is_floating_point():
                t = t.to(self._dtype)
                if self.options.get("channels_last") and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
            out.append(t)
        return out

    @contextlib.contextmanager
    def _context(self):
        """no_grad, TF32 on only for tf32, cudnn.benchmark as asked, autocast for autocast; restored after."""
        import torch

        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.target.precision == "tf32"
        torch.backends.cudnn.benchmark = bool(self.options.get("cudnn_benchmark"))
        autocast = (torch.autocast(device_type=self.target.device, dtype=torch.float16) if self.target.precision == "autocast"
                    else contextlib.nullcontext())
        try:
            with torch.no_grad(), autocast:
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved

    def _forward(self, args: list):
        try:
            return self.module(*args)
        except Exception as exc:  # noqa: BLE001 - the user's forward() raised: say so with the shapes given
            shapes = [tuple(a.shape) for a in args]
            raise TargetRunError(f"{self.label}: the module failed on inputs of shape {shapes}: {str(exc).splitlines()[0][:300]}") from None

    def run(self, feeds: dict[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        capture = check_capture(capture, self.capturable)
        seen: dict[str, np.ndarray] = {}

        def hook_for(name: str):
            def hook(_module, _inputs, output):
                first = next((v for _, v in _flatten(output)), None)
                if name not in seen and first is not None:
                    seen[name] = _numpy(first)
            return hook

        hooked = [c for c in capture if c in self._modules and c not in self.output_names]
        handles = [self._modules[c].register_forward_hook(hook_for(c)) for c in hooked]
        try:
            with self._context():
                outputs = self._name_outputs(self._forward(self._tensors(feeds)))
        finally:
            for h in handles:
                h.remove()
        if not capture:
            return outputs
        missing = [c for c in hooked if c not in seen]
        if missing:
            raise TargetRunError(f"{self.label}: module(s) {missing[:5]} produced no tensor on these inputs (not called?).")
        return {c: feeds[c] if c in self.input_names else outputs[c] if c in outputs else seen[c] for c in capture}

    def _name_outputs(self, output) -> dict[str, np.ndarray]:
        items = _flatten(output)
        keys = self.output_names if len(self.output_names) == len(items) else [k for k, _ in items]
        return {k: _numpy(v) for k, (_, v) in zip(keys, items)}

    def time(self, feeds: dict[str, np.ndarray], runs: int = 100, warmup: int = 10) -> list[float]:
        """Milliseconds per eager forward; inputs already on the device, CUDA synchronised around each run."""
        import torch

        args = self._tensors(feeds)
        sync = torch.cuda.synchronize if self.target.device == "cuda" else (lambda: None)
        with self._context():
            return time_runs(lambda: self._forward(args), runs, warmup, sync)

    def describe_inputs(self) -> tuple[InputInfo, ...]:
        return self._inputs or tuple(InputInfo(n, None, "unknown") for n in self.input_names)


def _numpy(value) -> np.ndarray:
    value = value.detach()
    return value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()


__all__ = ["ModuleCall", "TORCH_OPTIONS", "TorchRunner", "capture_module_outputs"]
