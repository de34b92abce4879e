"""``aligner`` command line: one module per subcommand, errors printed without tracebacks."""

from __future__ import annotations

import argparse
import logging
import sys

from aligner.version import __version__
from aligner.cli import bench as bench_cmd
from aligner.cli import bisect as bisect_cmd
from aligner.cli import build as build_cmd
from aligner.cli import compare as compare_cmd
from aligner.cli import demo as demo_cmd
from aligner.cli import doctor as doctor_cmd
from aligner.cli import eval as eval_cmd
from aligner.cli import inspect as inspect_cmd
from aligner.cli import plugins as plugins_cmd
from aligner.cli import precision as precision_cmd
from aligner.cli import report as report_cmd
from aligner.cli import view as view_cmd
from aligner.errors import AlignerError

COMMANDS = {"inspect": inspect_cmd, "compare": compare_cmd, "bisect": bisect_cmd, "precision": precision_cmd, "eval": eval_cmd, "bench": bench_cmd, "build": build_cmd, "plugins": plugins_cmd, "report": report_cmd, "view": view_cmd, "demo": demo_cmd, "doctor": doctor_cmd}

DESCRIPTION = """\
aligner finds where and why a deployed ONNX model's numbers drift from the reference.

  aligner demo                                   built-in example with an FP16 overflow
  aligner doctor model.onnx --target ort:cuda:fp16   all of the below on your model, one report
  aligner inspect model.onnx                     opset, I/O, op histogram, FP16 risks
  aligner compare model.onnx --target emu:fp16   layer-by-layer diff against ORT CPU FP32
  aligner bisect model.onnx                      first divergent node, root cause, repro
  aligner precision model.onnx                   smallest verified set of FP32 nodes for FP16
  aligner eval coco                              COCO mAP and MVRE across targets (built-in detector)
  aligner bench model.onnx --target ort:cuda:fp16 --batch 1,8   latency / throughput
  aligner build model.onnx --plan plan.json -o model.fp16.onnx  the deployable mixed model
  aligner report RUN_DIR... -o report.html       one self-contained HTML accuracy report
  aligner view RUN_DIR...                        the model in Model Explorer, nodes coloured by error, NaN, pins
  aligner plugins list                           custom ops (MaskedSoftmax, RoIAlign) and --fuse passes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aligner", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"aligner {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except AlignerError as exc:
        print(f"aligner {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
