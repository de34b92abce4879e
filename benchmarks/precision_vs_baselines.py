"""aligner precision vs onnxconverter-common auto_convert_mixed_precision vs AutoCast's rules.

    python benchmarks/precision_vs_baselines.py

Part 1 (simulation, no runtime): N nodes, k of them must stay FP32; a trial passes iff every one
of them is pinned. onnxconverter-common's own SegmentList drives its search (its real code, with
the model run replaced by the predicate); aligner's search_pins runs with (a) seeds that hold the k
nodes plus 3k false positives, (b) no seeds at all (growing from each failing trial's culprit).

Part 2 (real models, same inputs and acceptance): models with known overflow sites, all judged by
one acceptance check on the FP16 emulator (outputs finite, rel_l2 <= 2e-2):
* aligner: ``search_precision(target="emu:fp16")``: trials, pins, passes;
* onnxconverter-common: ``auto_convert_mixed_precision`` as shipped (its trials run the real FP16
  model on ONNX Runtime CPU, the only provider it uses), with our acceptance as its validate_fn;
  its final block list is then judged on the emulator;
* AutoCast's documented default rules (ModelOpt is not installable here): keep FP32 every node
  whose output exceeds data_max=512 on the reference and every node reading an initializer beyond
  init_max=65504; judged on the emulator.
"""

from __future__ import annotations

import random
import time

import numpy as np
from _work import work_dir

from aligner.backends import make_runner, reference_runner
from aligner.compare.metrics import rel_l2
from aligner.graph.model import ModelGraph
from aligner.inputs import make_inputs
from aligner.search.pins import Trial, search_pins
from aligner.search.precision import search_precision, value_ranges


def simulate_onnxconverter(n: int, bad: set[int]) -> int:
    """Trials of onnxconverter-common's search, using its own SegmentList."""
    from onnxconverter_common.auto_mixed_precision import SegmentList

    names = [str(i) for i in range(n)]
    segments = SegmentList(names)
    trials = 0
    while segments.get_largest() is not None:
        seg = segments.get_largest()
        blocked = {int(x) for x in segments.get_nodes(seg)}
        trials += 1
        if bad <= blocked:
            seg.good = True
        elif seg.size == 1:
            seg.bad = True
        else:
            seg.split()
    return trials + 1  # its final validation run


def simulate_aligner(n: int, bad: set[int], seeded: bool, rng: random.Random) -> int:
    names = {i: f"n{i:04d}" for i in range(n)}
    required = {names[i] for i in bad}
    count = [0]

    def check(pins: frozenset[str], phase: str) -> Trial:
        count[0] += 1
        missing = sorted(required - pins)
        return Trial(pins, not missing, phase, culprit=missing[0] if missing else None)

    seeds = []
    if seeded:
        extra = rng.sample([i for i in range(n) if i not in bad], 3 * len(bad))
        seeds = [names[i] for i in sorted(bad | set(extra))]
    cache: dict = {}

    def memo(pins, phase):
        if pins not in cache:
            cache[pins] = check(pins, phase)
        return cache[pins]

    pins, trial = search_pins(seeds, memo)
    assert trial is not None and set(pins) == required
    return count[0]


def part1() -> None:
    rng = random.Random(0)
    n = 1000
    print(f"Part 1: simulation, N = {n} nodes, trial passes iff all k required nodes are pinned (median of 5 placements)\n")
    print("| k required | onnxconverter-common trials | aligner trials, seeds = k + 3k false | aligner trials, no seeds |")
    print("|---|---|---|---|")
    for k in (1, 5, 20):
        oc, seeded, unseeded = [], [], []
        for _ in range(5):
            bad = set(rng.sample(range(n), k))
            oc.append(simulate_onnxconverter(n, bad))
            seeded.append(simulate_aligner(n, bad, True, rng))
            unseeded.append(simulate_aligner(n, bad, False, rng))
        print(f"| {k} | {int(np.median(oc))} | {int(np.median(seeded))} | {int(np.median(unseeded))} |")


# ---- part 2 ---------------------------------------------------------------------------------------

def accepts(graph: ModelGraph, feeds: dict, pins, ref=None) -> bool:
    ref = ref or reference_runner(graph).run(feeds)
    got = make_runner(graph, "emu:fp16", pins).run(feeds)
    return all(np.isfinite(got[k]).all() and rel_l2(v, got[k]) <= 2e-2 for k, v in ref.items() if v.dtype.kind == "f")


def autocast_rules(graph: ModelGraph, feeds: dict, data_max: float = 512.0, init_max: float = 65504.0) -> list[str]:
    from onnx import numpy_helper

    ranges = value_ranges(graph, [feeds])
    big_init = {n for n, t in graph.initializers.items() if t.data_type == 1 and np.abs(numpy_helper.to_array(t)).max(initial=0) > init_max}
    out = []
    for node in graph.nodes:
        if node.op_type == "Constant":
            continue
        if any(o in ranges and ranges[o].max_abs > data_max for o in node.output) or set(node.input) & big_init:
            out.append(node.name)
    return out


def onnxconverter(graph: ModelGraph, feeds: dict) -> tuple[int | str, list[str] | None]:
    from onnxconverter_common import auto_mixed_precision, float16

    trials, blocks = [0], []
    ref_outputs = graph.output_names
    real = float16.convert_float_to_float16

    def record(model, **kw):
        blocks.append(list(kw.get("node_block_list") or []))
        return real(model, **kw)

    def validate(res0, res1):
        trials[0] += 1
        return all(np.isfinite(b).all() and rel_l2(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= 2e-2
                   for a, b in zip(res0, res1) if np.asarray(a).dtype.kind == "f")

    auto_mixed_precision.float16.convert_float_to_float16 = record
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            auto_mixed_precision.auto_convert_mixed_precision(graph.model, feeds, validate_fn=validate, keep_io_types=True)
    except Exception as exc:  # report what it did and why it stopped
        return f"{trials[0]} (then failed: {str(exc).splitlines()[0][:80]})", None
    finally:
        auto_mixed_precision.float16.convert_float_to_float16 = real
    del ref_outputs
    return trials[0], blocks[-1] if blocks else []


def models() -> dict:
    import onnx
    import torch

    from aligner.examples import example_inputs, tiny_vit
    from aligner.examples.testmodels import build_cnn, export_detr
    from aligner.examples.testmodels import export_onnx as _export

    from aligner.examples.faults import inject_overflow_site

    work = work_dir("precision-baselines-")
    out = {"tiny_vit (built-in, 5 LayerNorms)": (ModelGraph(tiny_vit()), example_inputs())}
    cnn = ModelGraph.load(_export(build_cnn(), (torch.randn(1, 3, 32, 32),), work / "cnn.onnx", dynamo=False))
    feeds = make_inputs(cnn)
    for a, b in [("/layer1/conv1/Conv", "/layer1/conv2/Conv"), ("/layer2/conv1/Conv", "/layer2/conv2/Conv")]:
        inject_overflow_site(cnn, a, b, feeds)
    out["cnn, 2 injected sites"] = (ModelGraph(cnn.model), feeds)
    detr = ModelGraph.load(export_detr("legacy", work))
    feeds = make_inputs(detr)
    for layer in ("encoder/layers.0", "encoder/layers.1", "decoder/layers.1"):
        inject_overflow_site(detr, f"/detr/model/{layer}/mlp/fc1/MatMul", f"/detr/model/{layer}/mlp/fc2/MatMul", feeds)
    out["detr (legacy), 3 injected sites"] = (ModelGraph(detr.model), feeds)
    del onnx
    return out


def part2() -> None:
    print("\nPart 2: real models, acceptance = outputs finite and rel_l2 <= 2e-2 on emu:fp16\n")
    print("| model | nodes | method | trials | FP32 pins | passes on emu:fp16 | wall s |")
    print("|---|---|---|---|---|---|---|")
    for label, (graph, feeds) in models().items():
        n = len(graph.nodes)
        ref = reference_runner(graph).run(feeds)
        start = time.perf_counter()
        plan = search_precision(graph, samples=[feeds])
        print(f"| {label} | {n} | aligner | {plan.trials} (+{plan.culprit_runs} culprit runs) | {len(plan.pins)} | "
              f"{accepts(graph, feeds, plan.fp32_nodes, ref)} | {time.perf_counter() - start:.1f} |")
        start = time.perf_counter()
        trials, blocks = onnxconverter(graph, feeds)
        verdict = "-" if blocks is None else accepts(graph, feeds, [b for b in blocks if b in graph.node_by_name], ref)
        print(f"| {label} | {n} | onnxconverter-common | {trials} | {'-' if blocks is None else len(blocks)} | {verdict} | "
              f"{time.perf_counter() - start:.1f} |")
        start = time.perf_counter()
        rules = autocast_rules(graph, feeds)
        print(f"| {label} | {n} | AutoCast rules (data_max 512, init_max 65504) | 0 | {len(rules)} | "
              f"{accepts(graph, feeds, rules, ref)} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    part1()
    part2()
