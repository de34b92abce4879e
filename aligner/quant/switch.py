"""One QDQ model whose every Q/DQ pair can be switched off per run: INT8 emulated by tensor.

ONNX Runtime's quantizer puts a Q/DQ pair on a tensor when *any* node next to it is quantized, so
keeping one node in float often changes nothing (its neighbour still quantizes its input and
output) and sometimes makes things worse (a Conv kept in float no longer folds its Relu, whose
input — the wider pre-activation — then gets a Q/DQ of its own). What a float fallback really
buys is a set of tensors left unquantized. This module makes that explicit:

* :attr:`SwitchableQdq.adjacent` — for each quantized tensor, the quantizable nodes whose
  quantization puts the Q/DQ on it (its producer, its consumers, and the producer a folded
  Relu/Clip became part of): the tensor stays float only when all of them are excluded;
* :meth:`SwitchableQdq.runner` — the full QDQ model (the full model's calibrated scales) with
  ``Where(flag, DQ(Q(x)), x)`` on every switchable pair, run with Q/DQ in float (``emu:int8``,
  deterministic fake quantization) and the flags set from a set of excluded nodes: the emulated
  model of that exclusion without calling the quantizer;
* :meth:`SwitchableQdq.sensitivity` — each tensor's own share of the output error: the output's
  error with only that tensor quantized (one run per tensor, one session).

Trials of the pin search still quantize with ONNX Runtime and run on the real kernels; this
emulation only decides which exclusions are worth a trial.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aligner.graph.model import ModelGraph
from aligner.quant.match import DQ, Q, QdqMap, _RENAMED_OUTPUT

_QUANTIZED_WEIGHT = "_quantized"  # ONNX Runtime's name for a weight stored quantized: W -> W_quantized
_FLOAT_WEIGHT = "__aligner_float"
MASK = "aligner_quantize_mask"  # graph input of the switchable model: one bool per switchable tensor
RANKING_BYTES_PER_S = 2**30  # the emulated model's pace for the ranking's sample count: activations written per second
# (measured here, 2 cores under load: PP-OCR cls ~0.7 GB/s, PP-OCRv4 det 1024x800 ~2.6 GB/s)
BATCH_BUDGET_MB = 512  # samples stacked into one batch of the ranking: their activations fit this (compare's capture budget)


class SwitchableQdq:
    """The QDQ model ``qdq`` of ``graph`` (nothing excluded) with a switch on every Q/DQ pair (a weight's DQ too);
    ``universe``: the nodes a pin can exclude (the quantizable nodes)."""

    def __init__(self, graph: ModelGraph, qdq: onnx.ModelProto, universe: Iterable[str]):
        self.graph = graph
        qmap = QdqMap(graph, qdq)
        self.universe = tuple(universe)  # what another process needs to build the same switches
        universe = set(universe)
        pairs: dict[str, list[tuple[onnx.NodeProto | None, onnx.NodeProto]]] = {}  # original tensor -> its (Q, DQ) pairs
        for node in qdq.graph.node:
            if node.op_type == DQ and node.input[0] in qmap.inits:  # a weight, quantized once: no Q
                original = node.input[0].removesuffix(_QUANTIZED_WEIGHT)
                if original in graph.initializers:
                    pairs.setdefault(original, []).append((None, node))
            if node.op_type != Q or node.input[0] in qmap.inits:
                continue
            original = node.input[0].removesuffix(_RENAMED_OUTPUT)
            if original not in graph.tensors:
                continue
            for dq in (c for c in qmap.consumers.get(node.output[0], []) if c.op_type == DQ):
                pairs.setdefault(original, []).append((node, dq))
        order = {t: i for i, t in enumerate([*graph.input_names, *graph.activations()])}
        self.tensors: tuple[str, ...] = tuple(sorted(pairs, key=lambda t: order.get(t, len(order))))
        self.adjacent: dict[str, frozenset[str]] = {t: self._adjacent(t, pairs[t], qmap, universe) for t in self.tensors}
        weights = [graph.initializers[t] for t in self.tensors if pairs[t][0][0] is None]
        self.model = _switch_model(qdq, [pairs[t] for t in self.tensors], [self._folded(t, pairs[t], qmap) for t in self.tensors], weights)
        self._runner = None
        self.runs = 0  # runs of the switchable model so far (a batch of samples counts once)

    def _adjacent(self, tensor: str, pairs, qmap: QdqMap, universe: set[str]) -> frozenset[str]:
        graph = self.graph
        near = {c.name for c in graph.consumers.get(tensor, [])}
        producer = graph.producer.get(tensor)
        if producer is not None:
            near.add(producer.name)
        for q, _ in pairs:  # a folded Relu/Clip: the node that writes the tensor in the QDQ model quantizes it too
            writer = qmap.producer.get(q.input[0]) if q is not None else None
            if writer is not None and writer.name in graph.node_by_name:
                near.add(writer.name)
        return frozenset(near & universe)

    def _folded(self, tensor: str, pairs, qmap: QdqMap) -> list[onnx.NodeProto]:
        """The Relu/Clip the quantizer folded into this tensor's Q/DQ (its clamp is the quantization range):
        unquantized, the switch applies it again (with its constant bounds as initializers)."""
        original = self.graph.producer.get(tensor)
        if pairs[0][0] is None:
            return []
        writer = qmap.producer.get(pairs[0][0].input[0])
        if original is None or writer is None or writer.name == original.name:
            return []
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.name = f"{original.name}__aligner_unfolded"
        values = []
        for i, name in enumerate(node.input[1:], start=1):
            if name:
                value = _constant(self.graph, name)
                if value is None:
                    return []
                node.input[i] = f"{name}__aligner_bound"
                values.append(numpy_helper.from_array(value, node.input[i]))
        return [node, *values]

    # ---- which tensors an exclusion leaves float -----------------------------------------------

    def float_tensors(self, excluded: Iterable[str]) -> frozenset[str]:
        """The switchable tensors left unquantized when ``excluded`` nodes are kept in float: those whose
        every adjacent quantizable node is excluded."""
        excluded = set(excluded)
        return frozenset(t for t in self.tensors if self.adjacent[t] <= excluded)

    def exclusion_for(self, tensors: Iterable[str]) -> frozenset[str]:
        """The nodes to keep in float so that ``tensors`` stay unquantized."""
        return frozenset(n for t in tensors for n in self.adjacent.get(t, ()))

    def mask(self, quantized: Iterable[str]) -> np.ndarray:
        on = set(quantized)
        return np.array([t in on for t in self.tensors], dtype=bool)

    # ---- running it ------------------------------------------------------------------------------

    def runner(self, excluded: Iterable[str] = (), label: str = "emu:int8 (switchable Q/DQ)") -> "SwitchRunner":
        """A runner of the emulated model with ``excluded`` nodes kept in float (their tensors unquantized)."""
        left = self.float_tensors(excluded)
        return SwitchRunner(self, self.mask(t for t in self.tensors if t not in left), label)

    def run(self, feeds: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
        if self._runner is None:
            from aligner.backends.ort.runner import OrtRunner
            from aligner.backends.target import Target

            self._runner = OrtRunner(self.model, Target.parse("emu:int8"), optimize=False, label="emu:int8 (switchable Q/DQ)")
        self.runs += 1
        return self._runner.run({**feeds, MASK: mask})

    def sensitivity(self, samples: Sequence[Mapping[str, np.ndarray]], seconds: float = 120.0,
                    budget_mb: float = BATCH_BUDGET_MB, executor=None, options: tuple = ()) -> tuple[dict[str, float], int]:
        """Each tensor's own share of the output error: the worst output rel_l2 (against every switch
        off, the float model) with only that tensor quantized. Reads as many of ``samples`` as fit in
        about ``seconds`` (one tensor per run, a run's time estimated from the activations it writes at
        :data:`RANKING_BYTES_PER_S`, not measured: the count, and so the ranking and the plan, are the
        same on every run and any number of workers; samples stacked into batches where the inputs'
        first dimension is dynamic, as many per batch as one sample's activations fit in ``budget_mb``).
        ``executor`` (started with :class:`aligner.search.int8.QuantizedTrialJob`, whose target takes
        ``options``) runs the tensors in chunks on its workers, each building the same switches; the
        shares are the serial ones. Returns (shares, samples read)."""
        from aligner.quant.calib import report

        from aligner.compare.layerwise import estimate_sizes

        off = np.zeros(len(self.tensors), dtype=bool)
        per_run = sum(estimate_sizes(self.graph, dict(samples[0])).values()) / RANKING_BYTES_PER_S
        count = max(1, min(len(samples), int(seconds / max(per_run * len(self.tensors), 1e-9))))
        batches = _batches(self.graph, samples[:count], _per_batch(self.graph, samples[0], budget_mb))
        phase = f"ranking quantized tensors ({count} sample(s), emulated)"
        indices = range(len(self.tensors))
        if executor is None or executor.workers <= 1:
            reference = [self.run(feeds, off) for feeds in batches]
            worst = []
            for i in indices:
                report(phase, i + 1, len(self.tensors))
                worst += self.shares(batches, reference, [i])
        else:  # chunks of tensors, a few per worker, results taken in order
            size = max(1, -(-len(self.tensors) // (4 * executor.workers)))
            chunks = [list(indices[i:i + size]) for i in range(0, len(self.tensors), size)]
            tickets = [executor.submit(("rank", options, self.universe, batches, chunk)) for chunk in chunks]
            worst = []
            for chunk, ticket in zip(chunks, tickets):
                outcome = executor.result(ticket)
                if outcome.error is not None:
                    raise outcome.error
                worst += outcome.value
                self.runs += len(chunk) * len(batches)  # the workers' runs, counted as the serial ranking counts them
                report(phase, chunk[-1] + 1, len(self.tensors))
            self.runs += len(batches)  # the float reference
        return dict(zip(self.tensors, worst)), count

    def shares(self, batches: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Mapping[str, np.ndarray]] | None,
               indices: Sequence[int]) -> list[float]:
        """The worst output rel_l2 over ``batches`` with only tensor ``i`` quantized, for each of ``indices``
        (``reference``: the outputs with every switch off; None: computed here)."""
        from aligner.compare.metrics import rel_l2

        off = np.zeros(len(self.tensors), dtype=bool)
        if reference is None:
            reference = [self.run(feeds, off) for feeds in batches]
        out = []
        for i in indices:
            mask = off.copy()
            mask[i] = True
            worst = 0.0
            for feeds, ref in zip(batches, reference):
                got = self.run(feeds, mask)
                for name, r in ref.items():
                    if np.asarray(r).dtype.kind == "f":
                        value = rel_l2(r, got[name])
                        worst = max(worst, np.inf if np.isnan(value) else value)
            out.append(worst)
        return out


def _per_batch(graph: ModelGraph, feeds: Mapping[str, np.ndarray], budget_mb: float) -> int:
    """How many samples one batch takes: one sample's activations (estimated by shape inference) times
    that fits in ``budget_mb``; at least one."""
    from aligner.compare.layerwise import estimate_sizes

    per_sample = sum(estimate_sizes(graph, dict(feeds)).values()) or 1
    return max(1, int(budget_mb * 2**20 // per_sample))


def _batches(graph: ModelGraph, samples: Sequence[Mapping[str, np.ndarray]], size: int = 2**31) -> list[dict[str, np.ndarray]]:
    """``samples`` in batches of up to ``size`` (concatenated on axis 0) when every input's first
    dimension is dynamic and the samples agree on the rest; else as they are."""
    dynamic = all(graph.tensor(n).shape and not isinstance(graph.tensor(n).shape[0], int) or
                  (graph.tensor(n).shape and graph.tensor(n).shape[0] in (-1, 0)) for n in graph.input_names)
    same = all(set(s) == set(samples[0]) and all(np.shape(s[k])[1:] == np.shape(samples[0][k])[1:] for k in s) for s in samples)
    if len(samples) < 2 or not dynamic or not same:
        return [dict(s) for s in samples]
    return [{k: np.concatenate([np.asarray(s[k]) for s in samples[i:i + size]]) for k in samples[0]} for i in range(0, len(samples), size)]


class SwitchRunner:
    """The switchable model with one mask: what an acceptance check runs (``run(feeds)`` gives the outputs)."""

    def __init__(self, switch: SwitchableQdq, mask: np.ndarray, label: str):
        self.switch, self.mask, self.label = switch, mask, label
        self.input_names, self.output_names = list(switch.graph.input_names), list(switch.graph.output_names)

    def run(self, feeds: Mapping[str, np.ndarray], capture: Sequence[str] = ()) -> dict[str, np.ndarray]:
        if capture:
            raise ValueError("the switchable INT8 emulation gives the model's outputs only")
        return self.switch.run(feeds, self.mask)


def _switch_model(qdq: onnx.ModelProto, pairs: list[list[tuple[onnx.NodeProto | None, onnx.NodeProto]]],
                  folded: list[list], weights: list[onnx.TensorProto]) -> onnx.ModelProto:
    """``qdq`` with each listed pair ``x -> Q -> DQ -> d`` replaced by ``d = If(mask[i], DQ(Q(x)), x)``
    (``x`` through the folded Relu/Clip of ``folded[i]`` where there is one; a quantized weight's
    ``x`` is its float initializer, from ``weights``). ``If`` runs one branch only, so a run with few
    tensors quantized costs about what the float model does."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    for weight in weights:  # the float weights, renamed (a quantized bias's DQ writes the bias's own name)
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(weight), weight.name + _FLOAT_WEIGHT))
    switched = {n.output[0] for group in pairs for q, dq in group for n in (q, dq) if n is not None}
    by_output = {n.output[0]: n for n in model.graph.node}
    replace = {}  # DQ output -> the nodes computing it now
    for i, group in enumerate(pairs):
        q0, dq0 = group[0]
        source = q0.input[0] if q0 is not None else dq0.input[0].removesuffix(_QUANTIZED_WEIGHT) + _FLOAT_WEIGHT
        act, *bounds = folded[i] or [None]
        model.graph.initializer.extend(bounds)
        for q, dq in group:
            out = dq.output[0]
            off = []
            if act is not None:
                off = [_copy(act)]
                off[0].input[0], off[0].output[0] = source, f"{out}__aligner_unfolded"
            flag = helper.make_node("Gather", [MASK, f"{out}__aligner_qi"], [f"{out}__aligner_qf"], name=f"{out}__aligner_gather")
            model.graph.initializer.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"{out}__aligner_qi"))
            then_dq = _copy(by_output[out])
            then = [then_dq]
            if q is not None:
                then_q = _copy(by_output[q.output[0]])
                then_q.output[0] = then_dq.input[0] = f"{out}__aligner_q"
                then = [then_q, then_dq]
            then_dq.output[0] = f"{out}__aligner_on"
            on = helper.make_graph(then, f"{out}_on", [], [helper.make_tensor_value_info(then_dq.output[0], TensorProto.FLOAT, None)])
            last = off[-1].output[0] if off else source
            else_nodes = off + [helper.make_node("Identity", [last], [f"{out}__aligner_off"])]
            off_graph = helper.make_graph(else_nodes, f"{out}_off", [], [helper.make_tensor_value_info(f"{out}__aligner_off", TensorProto.FLOAT, None)])
            replace[out] = [flag, helper.make_node("If", [flag.output[0]], [out], name=f"{out}__aligner_switch", then_branch=on, else_branch=off_graph)]
    nodes = []
    for node in model.graph.node:
        if node.output and node.output[0] in replace:
            nodes += replace[node.output[0]]
        elif not node.output or node.output[0] not in switched:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.input.append(helper.make_tensor_value_info(MASK, TensorProto.BOOL, [len(pairs)]))
    return model


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _constant(graph: ModelGraph, name: str) -> np.ndarray | None:
    """The value of a constant tensor of ``graph`` (an initializer or a Constant node's output), else None."""
    if name in graph.initializers:
        return numpy_helper.to_array(graph.initializers[name])
    node = graph.producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


__all__ = ["MASK", "SwitchRunner", "SwitchableQdq"]
