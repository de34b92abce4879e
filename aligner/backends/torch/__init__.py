"""PyTorch eager (``torch:cpu:fp32``, ``torch:cuda:fp32|tf32|fp16|bf16|autocast``): the module itself as a target.

A ``torch`` target runs an ``nn.Module`` (CLI: ``--torch MODULE:FUNCTION``), not the ONNX graph,
which only names its inputs and outputs (:class:`aligner.backends.torch.runner.TorchRunner`).
"""

from __future__ import annotations

from aligner.backends.registry import Backend
from aligner.errors import TargetError


def _runner(graph, target, keep_io_types: bool, module):
    if module is None:
        raise TargetError(f"Target {target} runs a PyTorch module, not an ONNX graph: pass the module "
                          "(make_runner(graph, target, module=model); CLI: --torch MODULE:FUNCTION). The ONNX graph "
                          "names its inputs and outputs.")
    from aligner.backends.base import describe_model_inputs
    from aligner.backends.torch.runner import TorchRunner

    return TorchRunner(module, target, graph.input_names, graph.output_names, describe_model_inputs(graph.model))


def _options(target) -> dict[str, str]:
    from aligner.backends.base import check_options
    from aligner.backends.torch.runner import TORCH_OPTIONS

    return check_options(target, TORCH_OPTIONS)


BACKEND = Backend(
    name="torch",
    title="PyTorch",
    devices={"cpu": ("fp32",), "cuda": ("fp32", "tf32", "fp16", "bf16", "autocast")},
    default_device="cpu",
    default_precision="fp32",
    runner=_runner,
    options=_options,
    help="torch:cpu:fp32, torch:cuda:fp32|tf32|fp16|bf16|autocast (PyTorch eager)",
    runs_onnx=False,
    advice=lambda target: "try @cudnn_benchmark=1 or @channels_last=1",
)
