"""A runtime that crashes is a target failure with a message (exit 3), never the death of aligner.

The case is real: ONNX Runtime 1.2x's CPU provider segfaults while optimizing the example
detector's FP16 graph when only its output is fetched (issue 20). If a future ONNX Runtime stops
crashing there, the first test says so and must be replaced by another crashing model.
"""

import subprocess
import sys

import pytest

from aligner import bisect, make_inputs, make_runner
from aligner.errors import TargetRunError
from aligner.examples import shapes_detector_path
from aligner.graph.model import ModelGraph


@pytest.fixture(scope="module")
def detector():
    return ModelGraph.load(shapes_detector_path())


def test_a_crashing_runtime_is_a_target_failure(detector):
    feeds = make_inputs(detector, {"pixels": (1, 3, 128, 128)})
    with pytest.raises(TargetRunError, match=r"ONNX Runtime crashed \(signal SIGSEGV\)") as info:
        make_runner(detector, "ort:cpu:fp16").run(feeds)
    assert "detections" in str(info.value)  # what was being run
    # the process lives on, and the next run starts a fresh child: the reference side is unaffected
    assert make_runner(detector, "ort:cpu:fp32").run(feeds)["detections"].shape[0] == 1


def test_bisect_reports_the_crash_with_exit_3(detector, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", "bisect", str(shapes_detector_path()), "--target", "ort:cpu:fp16",
                           "--strategy", "frontier", "--input-shapes", "pixels:1x3x128x128", "--json", str(tmp_path / "v.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "crashed" in proc.stdout and "Traceback" not in proc.stderr
    result = bisect(detector, target="ort:cpu:fp16", strategy="frontier", feeds=make_inputs(detector, {"pixels": (1, 3, 128, 128)}))
    assert result.failed and not result.diverged and result.probes[-1].status == "failed"


def test_sandbox_can_be_turned_off_and_gives_the_same_numbers(detector):
    feeds = make_inputs(detector, {"pixels": (1, 3, 128, 128)})
    names = detector.activations()[:5]
    boxed = make_runner(detector, "ort:cpu:fp32").run(feeds, names)
    inline = make_runner(detector, "ort:cpu:fp32@sandbox=0").run(feeds, names)
    assert all((boxed[n] == inline[n]).all() for n in names)
