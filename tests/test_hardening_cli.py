"""Every subcommand answers bad input with exit 2 and a message — no traceback, no file lost.

Families: nonsense numbers, outputs that collide or cannot be written, damaged input files.
Each case runs the real CLI in-process (argparse errors are SystemExit 2; anything else that
escapes ``main`` is a traceback a user would see).
"""

import json

import numpy as np

from aligner.cli.main import main
from aligner.examples import shapes_detector_path

DET = str(shapes_detector_path())


def _cases(tmp):
    npz = tmp / "in.npz"
    np.savez(npz, pixels=np.zeros((1, 3, 128, 128), np.float32))
    (tmp / "cut.npz").write_bytes(npz.read_bytes()[:200])
    (tmp / "empty.json").write_text("[]")
    (tmp / "afile").write_text("x")
    (tmp / "existing.json").write_text("{}")
    (tmp / "run").mkdir()
    (tmp / "run" / "meta.json").write_text("{}")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({"fp32_nodes": [{"node": "/stem_norm/Pow"}]}))
    base = [DET, "--input-shapes", "pixels:1x3x128x128"]
    return {
        "compare threshold nan": ["compare", *base, "--threshold", "nan"],
        "compare threshold inf": ["compare", *base, "--threshold", "inf"],
        "compare atol negative": ["compare", *base, "--atol", "-1"],
        "compare budget negative": ["compare", *base, "--capture-budget-mb", "-5"],
        "compare json and csv on one path": ["compare", *base, "--json", str(tmp / "x"), "--csv", str(tmp / "x")],
        "compare json below a file": ["compare", *base, "--json", str(tmp / "afile" / "x.json")],
        "compare json is a directory": ["compare", *base, "--json", str(tmp), "--force"],
        "compare existing json": ["compare", *base, "--json", str(tmp / "existing.json")],
        "compare run onto an existing run": ["compare", *base, "--run", str(tmp / "run")],
        "compare run is a file": ["compare", *base, "--run", str(tmp / "afile"), "--force"],
        "compare truncated npz": ["compare", DET, "--inputs", str(tmp / "cut.npz")],
        "compare inputs []": ["compare", DET, "--inputs", str(tmp / "empty.json")],
        "compare bad target option": ["compare", *base, "--target", "emu:fp16@capture=some"],
        "compare unknown option": ["compare", *base, "--target", "ort:cpu:fp16@cudnn_conv_algo_search=HEURISTIC"],
        "compare bad pin": ["compare", *base, "--fp32-nodes", "/stem_norm/Pw"],
        "bisect window negative": ["bisect", *base, "--window", "-3"],
        "bisect sweep negative": ["bisect", *base, "--sweep-runs", "-1"],
        "bisect threshold nan": ["bisect", *base, "--threshold", "nan"],
        "bisect plan missing": ["bisect", *base, "--plan", str(tmp / "nope.json")],
        "precision out and trials one path": ["precision", *base, "--out", str(tmp / "p.json"), "--trials", str(tmp / "p.json")],
        "precision out and save-model one path": ["precision", *base, "--out", str(tmp / "q.json"), "--save-model", str(tmp / "q.json")],
        "precision inputs []": ["precision", DET, "--inputs", str(tmp / "empty.json")],
        "precision save-inputs existing": ["precision", DET, "--inputs", str(npz), "--save-inputs", str(tmp / "existing.json")],
        "bench batch zero": ["bench", DET, "--target", "ort:cpu:fp32", "--batch", "1,0,-1"],
        "build output exists": ["build", DET, "--target", "ort:cpu:fp16", "-o", str(tmp / "existing.json")],
        "build plan not a plan": ["build", DET, "--target", "ort:cpu:fp16", "--plan", str(tmp / "empty.json"), "-o", str(tmp / "o.onnx")],
        "demo out is a file": ["demo", "--out", str(tmp / "afile")],
        "report not a run": ["report", str(tmp / "afile"), "-o", str(tmp / "r.html")],
        "inspect not onnx": ["inspect", str(tmp / "afile")],
        "plugins show unknown": ["plugins", "show", "nosuchop"],
    }


def test_every_bad_input_is_exit_2_without_traceback_and_loses_no_file(tmp_path, capsys):
    cases = _cases(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    failures = []
    for label, argv in cases.items():
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage error
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - a traceback the user would see
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        _, err = capsys.readouterr()
        if code != 2 or not err.strip():
            failures.append(f"{label}: exit {code}, stderr {err.strip()[-200:]!r}")
    assert not failures, f"{len(failures)} of {len(cases)} bad inputs were not a clean exit 2:\n" + "\n".join(failures)
    after = {p: p.read_bytes() for p in before}
    assert after == before  # no user file changed
    subcommands = {argv[0] for argv in cases.values()}
    assert subcommands >= {"compare", "bisect", "precision", "bench", "build", "demo", "report", "inspect", "plugins"}


def test_the_symbolic_batch_warning_is_said_once_per_input(tmp_path, capsys, caplog):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "sym.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    for verb in ("compare", "bisect", "precision"):
        caplog.clear()
        main([verb, str(path), "--target", "emu:fp16"])
        said = [r.getMessage() for r in caplog.records if "symbolic batch dim" in r.getMessage()]
        assert len(said) == 1, (verb, said)
