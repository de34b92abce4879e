"""Where a runtime that fails (crashes, or refuses the model) starts failing.

When the target cannot build or run the whole model, there is nothing to compare; what the user
needs is the node whose presence makes the runtime fail. The search runs prefixes of the
topological order — the first ``k`` nodes, with every tensor that crosses the cut as a graph output
(what Polygraphy's ``debug reduce`` does with a check command, by hand) — and halves ``k`` to the
smallest prefix that fails. The last node of that prefix is the suspect: ⌈log2 N⌉ target runs, each
in the sandbox, so a crash is one more answer and not the end of aligner. The suspect is then run
alone on reference inputs to say whether it fails by itself or only in its context (a fusion
pattern or an optimizer pass that needs its neighbours).

Caveat, stated in the verdict: a runtime's optimizer sees a different graph in each prefix, so the
search assumes that a failing prefix keeps failing when nodes are added after it; the answer is
the smallest failing prefix, and the full model's failure is re-checked first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx

from aligner.backends import Runner, backend_of, make_runner
from aligner.backends.target import Target
from aligner.errors import AlignerError, TargetRunError
from aligner.graph.capture import extract_subgraph, with_outputs
from aligner.graph.model import ModelGraph, _node_inputs
from aligner.inputs import Feeds, write_atomic
from aligner.search.frontier import bisect_cuts, frontier, spans
from aligner.search.verdict import FailureSite

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]


def prefix_model(graph: ModelGraph, order: list[str], lives, cut: int) -> onnx.ModelProto:
    """The first ``cut`` compute nodes of ``order`` (Constants they read come along), with every
    tensor crossing the cut as a graph output."""
    keep = set(order[:cut])
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    nodes = [n for n in model.graph.node if n.name in keep or n.op_type == "Constant"]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return with_outputs(graph, frontier(lives, cut), replace=True, base=model)


def locate_failure(graph: ModelGraph, target: Target, feeds: Feeds, reference: Runner,
                   progress: Progress | None = None, save: Path | None = None) -> FailureSite | None:
    """The node whose presence makes ``target`` fail on ``graph`` (None if the whole model runs)."""
    order = [n.name for n in graph.nodes if n.op_type != "Constant"]
    lives = spans([(sorted(_node_inputs(graph.node(x))), list(graph.node(x).output)) for x in order], graph.output_names)
    errors: dict[int, str] = {}

    def fails(cut: int) -> bool:
        model = prefix_model(graph, order, lives, cut)
        sub = ModelGraph(model)
        pins = [p for p in target.pins if p in set(order[:cut])]
        try:
            make_runner(sub, replace(target, pins=tuple(pins), plan=None)).run(feeds)
        except AlignerError as exc:  # a crash, a refusal, or a piece the runtime's tools will not take
            errors[cut] = str(exc)
        if progress:
            progress("failure", len(known), 0)
        log.info("prefix of %d node(s): %s", cut, "fails" if cut in errors else "runs")
        return cut in errors

    known: dict[int, bool] = {}
    j = bisect_cuts(len(order), fails, known)
    runs = len(known) - 1  # cut 0 is known without a run
    if j is None:
        return None
    name = order[j]
    node = graph.node(name)
    alone = _fails_alone(graph, node, target, feeds, reference)
    workarounds = _workarounds(graph, target, name, feeds)
    repro = None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        path = save / "failing_prefix.onnx"
        write_atomic(path, prefix_model(graph, order, lives, j + 1).SerializeToString())
        repro = str(path)
    return FailureSite(name, node.op_type, j, j + 1, errors.get(j + 1, ""), alone, runs + (alone is not None) + len(workarounds),
                       repro, tuple(w for w, ok in workarounds.items() if ok), tuple(w for w, ok in workarounds.items() if not ok))


def _workarounds(graph: ModelGraph, target: Target, suspect: str, feeds: Feeds) -> dict[str, bool]:
    """Each candidate fix tried on the whole model: does the target run with it?"""
    tries = {}
    if target.precision in ("fp16", "bf16") and suspect not in target.pins:
        tries[f"--fp32-nodes {suspect}"] = target.with_pins([*target.pins, suspect])
    tries.update(backend_of(target).workarounds(target))  # the runtime's own (ONNX Runtime: a lower optimization level)
    runs = {}
    for label, variant in tries.items():
        try:
            make_runner(graph, variant).run(feeds)
            runs[label] = True
        except AlignerError:
            runs[label] = False
    return runs


def _fails_alone(graph: ModelGraph, node: onnx.NodeProto, target: Target, feeds: Feeds, reference: Runner) -> bool | None:
    inputs = [t for t in _node_inputs(node) if t and t in graph.tensors and graph.tensors[t].kind in ("input", "activation")]
    try:
        values = reference.run(feeds, [t for t in inputs if t not in feeds])
        values.update({t: feeds[t] for t in inputs if t in feeds})
        sub = ModelGraph(extract_subgraph(graph, inputs, [o for o in node.output if o]))
        pins = (node.name,) if node.name in target.pins else ()
    except AlignerError as exc:  # the node cannot be cut out on its own (e.g. it reads a subgraph's outer scope)
        log.info("node %s not run alone: %s", node.name, exc)
        return None
    try:
        make_runner(sub, replace(target, pins=pins, plan=None)).run(values)
    except TargetRunError:
        return True
    except AlignerError as exc:
        log.info("node %s not run alone: %s", node.name, exc)
        return None
    return False


__all__ = ["locate_failure", "prefix_model"]
