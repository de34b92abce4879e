"""``aligner inspect``: what is in a model and where FP16 is likely to break."""

from __future__ import annotations

import argparse

import numpy as np

from rich.console import Console
from rich.table import Table
from rich.markup import escape

from aligner.cli.common import non_negative_int
from aligner.graph.model import ModelGraph
from aligner.graph.risk import fp16_risks


EPILOG = """\
The FP16 risks are static (structure and weights): a decomposed LayerNorm's Pow, an Exp without
max subtraction, weights beyond 65504. Whether they overflow depends on the data: aligner compare
model.onnx --target emu:fp16 --inputs real.npz checks it.

examples:
  aligner inspect model.onnx
  aligner inspect model.onnx --top-ops 40
  aligner inspect model.onnx --no-check          # a model the ONNX checker rejects

exit status: 0 read, 2 the file is missing, not ONNX, truncated or invalid
"""


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="opset, inputs/outputs, op histogram, nodes at FP16 risk",
                       description="Summarise an ONNX model: opset, I/O with shapes, node count, op histogram, and nodes at FP16 risk.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="path to the .onnx model")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX checker")
    p.add_argument("--top-ops", type=non_negative_int, default=15, help="op types to list (default 15)")


def run(args: argparse.Namespace) -> int:
    graph = ModelGraph.load(args.model, check=not args.no_check)
    console = Console(highlight=False)
    m = graph.model
    console.print(f"[bold]{escape(args.model)}[/]  opset {graph.opset}  IR {m.ir_version}  producer {escape(m.producer_name or '?')} {escape(m.producer_version)}")
    params = sum(int(np.prod(t.dims)) for t in graph.initializers.values())
    console.print(f"{len(graph.nodes)} nodes, {len(graph.initializers)} initializers ({params:,} values)")
    io = Table("", "name", "dtype", "shape", box=None)
    for info in graph.input_infos():
        io.add_row("input", escape(info.name), info.dtype_name, info.shape_str())
    for name in graph.output_names:
        info = graph.tensors[name]
        io.add_row("output", escape(name), info.dtype_name, info.shape_str())
    console.print(io)
    ops = Table("op type", "count", box=None)
    for op, count in graph.op_histogram().most_common(args.top_ops):
        ops.add_row(escape(op), str(count))
    console.print(ops)
    risks = fp16_risks(graph)
    if risks:
        table = Table("#", "node", "op", "FP16 risk", title=f"{len(risks)} node(s) at FP16 risk", title_justify="left")
        for r in risks:
            table.add_row(str(graph.index_of[r.node]), escape(r.node), r.op_type, escape(r.reason))
        console.print(table)
    else:
        console.print("No static FP16 risks found (value-range risks need a run: aligner compare --target emu:fp16).")
    from aligner.passes.layernorm import find_layernorms
    from aligner.passes.masked_softmax import find_masked_softmaxes

    fusable, _ = find_layernorms(graph)  # matching only: no copy of the model
    if fusable:
        console.print(f"{len(fusable)} decomposed LayerNorm(s) can become LayerNormalization (statistics in FP32): "
                      "aligner build --fuse layernorm")
    masked = find_masked_softmaxes(graph)[2]
    if masked:
        console.print(f"{len(masked)} additive-mask softmax(es) can become aligner::MaskedSoftmax (no FP16 -inf mask, no Where): "
                      "aligner build --fuse masked-softmax")
    roi = graph.op_histogram().get("RoiAlign", 0)
    if roi:
        console.print(f"{roi} RoiAlign node(s): aligner build --fuse roi-align gives the aligner::RoIAlign plugin (boxes kept FP32)")
    return 0
