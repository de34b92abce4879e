"""The example detector's FP16 precision search with a COCO acceptance, serial vs N worker processes.

    python benchmarks/parallel_search.py [--images 300] [--workers 1,2] [--rounds 1] [--eval]

The shapes detector (aligner.examples), its FP16 overflow found by ``search_precision`` on
``emu:fp16``; every trial is a COCO evaluation of the mixed model on ``--images`` generated val
images (aligner.examples.shapes, seed 7), passing when AP is at most 0.005 below FP32's (the
demo's acceptance). Each worker count runs the same search from a fresh trials log; the table
gives wall seconds, trials, the executor's tasks (a trial is one task, or several parts over shards of
the images when there are more workers than trials at a time) and those run ahead but not needed,
the speed-up over the serial row, and whether the plan and the trials log (pins, verdicts, order)
equal the serial ones. Rounds are
interleaved (1, 2, 1, 2, ...) and the median is reported. The machine's load average is printed
before and after: on a shared machine it says what else ran. ``--eval`` adds ``aligner eval coco``'s
table (ort:cpu:fp32 and emu:fp16 on the same images, image shards on the workers; same metrics?).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from _work import work_dir

from aligner.backends import reference_runner
from aligner.eval.dataset import CocoDataset
from aligner.eval.run import coco_acceptance
from aligner.examples import shapes_adapter, shapes_detector_path, shapes_preprocess
from aligner.examples.shapes import write_split
from aligner.graph.model import ModelGraph
from aligner.search.workers import make_executor
from aligner.search.precision import search_precision


def _decisions(log: Path) -> list:
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    return [(r["pins"], r["passed"], r["phase"], r["culprit"], r["error"], r["reason"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts; 1 (serial) is the baseline")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--eval", action="store_true", help="also time eval coco over image shards")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    work = work_dir("parallel_search-")
    split = write_split(work / "val", args.images, seed=7)
    graph = ModelGraph.load(shapes_detector_path())
    dataset = CocoDataset(split / "images", split / "instances.json")
    preprocess, adapter = shapes_preprocess(), shapes_adapter()
    images, _, _ = next(dataset.batches(preprocess, 50))
    accept = coco_acceptance(dataset, adapter, preprocess, reference_runner(graph), max_drop=0.005)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()}")
    print(f"model {shapes_detector_path().name} ({len(graph.nodes)} nodes), {len(dataset)} val images, accept: {accept.task_name}")
    walls: dict[int, list[float]] = {w: [] for w in counts}
    result: dict[int, tuple] = {}
    for r in range(args.rounds):
        for w in counts:
            log = work / f"trials-w{w}-r{r}.jsonl"
            start = time.perf_counter()
            with make_executor(w) as executor:
                plan = search_precision(graph, "emu:fp16", samples=[{"pixels": images}], accept=accept, trials_log=log, workers=executor)
            walls[w].append(time.perf_counter() - start)
            result[w] = (plan, _decisions(log), executor.stats())
            print(f"  round {r + 1}, {w} worker(s): {walls[w][-1]:.1f} s, {plan.trials} trials, pins {plan.fp32_nodes}")
    print(f"load average after: {os.getloadavg()}\n")
    base_plan, base_log, _ = result[counts[0]]
    base = statistics.median(walls[counts[0]])
    print("| workers | wall s (median) | trials | tasks (not needed) | task s in workers | speed-up | same plan | same trials log |")
    print("|---|---|---|---|---|---|---|---|")
    for w in counts:
        plan, decisions, stats = result[w]
        wall = statistics.median(walls[w])
        print(f"| {w} | {wall:.1f} | {plan.trials} | {stats.tasks} ({stats.wasted}) | {sum(s.seconds for s in stats.workers):.1f} | {base / wall:.2f}x | "
              f"{'yes' if plan.to_dict() == base_plan.to_dict() else 'NO'} | {'yes' if decisions == base_log else 'NO'} |")
    print(f"\nplan: {base_plan.fp32_nodes} ({'PASSED' if base_plan.passed else 'no plan'}); work folder {work}")
    if args.eval:
        _eval_table(graph, dataset, counts, args.rounds)


def _eval_table(graph, dataset, counts: list[int], rounds: int) -> None:
    from aligner.eval.run import evaluate_detector

    walls: dict[int, list[float]] = {w: [] for w in counts}
    docs = {}
    for _ in range(rounds):
        for w in counts:
            start = time.perf_counter()
            result = evaluate_detector(graph, dataset, shapes_adapter(), shapes_preprocess(), ["ort:cpu:fp32", "emu:fp16"], batch=50,
                                       workers=w)
            walls[w].append(time.perf_counter() - start)
            docs[w] = {k: {m: v for m, v in t.items() if m not in ("seconds", "images_per_s")} for k, t in result.to_dict()["targets"].items()}
    base = statistics.median(walls[counts[0]])
    print(f"\neval coco, {len(dataset)} images x 2 targets; load average now: {os.getloadavg()}\n")
    print("| workers | wall s (median) | speed-up | same metrics (AP ... MVRE, every digit) |")
    print("|---|---|---|---|")
    for w in counts:
        wall = statistics.median(walls[w])
        print(f"| {w} | {wall:.1f} | {base / wall:.2f}x | {'yes' if docs[w] == docs[counts[0]] else 'NO'} |")


if __name__ == "__main__":
    main()
