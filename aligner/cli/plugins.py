"""``aligner plugins``: the custom ops aligner knows, the passes that insert them, what runs them."""

from __future__ import annotations

import argparse
import importlib.util

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aligner.plugin import DOMAIN, TRT_NAMESPACE, get, plugins

EPILOG = f"""\
Each plugin is one folder under plugins/ (package aligner_plugins): the spec (domain {DOMAIN!r},
inputs, attributes, shape rule), a NumPy reference implementation, and a Triton kernel. From the
spec aligner registers the ONNX schema (checker, shape inference, precision rewrite), the ONNX
Runtime CPU custom op (the reference, through onnxruntime-extensions: pip install 'aligner[plugins]')
and a TensorRT IPluginV3 (namespace {TRT_NAMESPACE!r}) that launches the kernel.

examples:
  aligner plugins list
  aligner plugins show MaskedSoftmax
  aligner build model.onnx --fuse layernorm,masked-softmax -o model.fused.onnx --target ort:cpu:fp32
  aligner compare model.onnx --target-model model.fused.onnx --target ort:cuda:fp16
"""


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list the custom ops (plugins) and the passes that insert them",
                       description="The plugin ops aligner defines, the --fuse passes, and which runtimes can run them here.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list", help="list (default) or show NAME")
    p.add_argument("name", nargs="?", help="plugin op name for show (e.g. MaskedSoftmax)")


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run(args: argparse.Namespace) -> int:
    from aligner.passes import PASS_DOCS

    console = Console(highlight=False)
    if args.action == "show":
        from aligner.errors import InputError

        if not args.name:
            raise InputError("aligner plugins show NAME: give a plugin name (aligner plugins list shows them).")
        spec = get(args.name)
        console.print(f"[bold]{DOMAIN}::{escape(spec.name)}[/] v{spec.version}  (folder plugins/{escape(spec.folder)}, "
                      f"TensorRT plugin {TRT_NAMESPACE}::{escape(spec.name)})")
        for paragraph in spec.doc.strip().split("\n\n"):
            console.print(escape(" ".join(paragraph.split())) + "\n")
        table = Table("", "name", "type", "", box=None)
        for p in spec.inputs:
            table.add_row("input", p.name, "T (float32/16, bf16)" if p.type == "T" else p.type, escape(p.doc))
        for p in spec.outputs:
            table.add_row("output", p.name, "T" if p.type == "T" else p.type, escape(p.doc))
        for k, v in spec.attributes.items():
            table.add_row("attribute", k, type(v).__name__, f"default {v!r}")
        console.print(table)
        console.print(f"inserted by: --fuse {spec.fusion} (replaces {escape(spec.replaces)}); GPU kernel: {spec.kernel}")
        return 0
    table = Table("plugin op", "inputs", "--fuse", "replaces", title="plugin ops (aligner plugins show NAME for the spec)", title_justify="left")
    for spec in plugins().values():
        table.add_row(f"{DOMAIN}::{spec.name}", ", ".join(f"{p.name}:{p.type.replace('tensor(', '').rstrip(')')}" for p in spec.inputs),
                      spec.fusion, escape(spec.replaces))
    console.print(table)
    passes = Table("--fuse", "rewrite", title="passes (aligner build --fuse a,b)", title_justify="left")
    for name, doc in PASS_DOCS.items():
        passes.add_row(name, escape(doc))
    console.print(passes)
    runtimes = [("ONNX Runtime CPU custom ops (reference)", _have("onnxruntime_extensions"), "pip install 'aligner[plugins]'"),
                ("Triton kernels (TensorRT plugin enqueue)", _have("triton"), "a CUDA build of torch with triton"),
                ("TensorRT / TensorRT-RTX to build engines", _have("tensorrt") or _have("tensorrt_rtx"), "pip install 'aligner[tensorrt]'")]
    for what, ok, how in runtimes:
        console.print(f"  {'[green]available[/]' if ok else '[yellow]missing[/]  '}  {what}" + ("" if ok else f" ({escape(how)})"))
    return 0
