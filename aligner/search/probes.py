"""The evidence of one bisect: both sides, every probe run and every tensor diffed so far
(:class:`BisectRun`), and the probe a worker runs (:class:`ProbeJob`).

:func:`aligner.search.bisect.bisect` fills a :class:`BisectRun`; the root cause
(:mod:`aligner.search.explain`) and the reproducer (:mod:`aligner.search.repro`) read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aligner.backends import Runner, make_runner, reference_runner
from aligner.backends.target import Target
from aligner.compare.capture import Observer
from aligner.compare.layerwise import diff_row
from aligner.compare.results import TensorDiff
from aligner.compare.tolerance import Tolerance
from aligner.errors import TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import Feeds
from aligner.search.executor import Executor
from aligner.search.verdict import Probe

Progress = Callable[[str, int, int], None]


@dataclass
class BisectRun:
    """State of one bisect: both sides, the probes so far, every tensor diffed so far."""

    graph: ModelGraph
    other: ModelGraph
    feeds: Feeds
    target: Target
    tol: Tolerance
    ref: Runner
    tgt: Runner
    order: list[str]  # compute nodes of the reference, topological
    progress: Progress | None
    observer: Observer
    probes: list[Probe] = field(default_factory=list)
    diffs: dict[str, TensorDiff] = field(default_factory=dict)
    executor: Executor | None = None  # --workers: probes that are separate runs go to its workers
    pending: dict[tuple, int] = field(default_factory=dict)  # probes sent ahead: (kind, cut or group) -> ticket

    def capturable(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.tgt.capturable and n in self.ref.capturable]

    def capture(self, names: list[str], phase: str, cut: int | None = None, judged: set[str] | None = None,
                ticket: int | None = None) -> list[TensorDiff]:
        """One probe: ``names`` captured on both sides and diffed; ``judged``: the tensors whose verdict is
        the probe's (a frontier's crossing tensors; the rest ride along for the sweep). ``ticket``: the
        probe of these names sent ahead to a worker (:class:`ProbeJob`): its diffs, labelled here."""
        names = self.capturable(names)
        node = self.order[cut - 1] if cut else ""
        try:
            if ticket is not None:
                outcome = self.executor.result(ticket)
                if outcome.error is not None:
                    raise outcome.error
                raw, moved = outcome.value
            else:
                ref_values = self.ref.run(self.feeds, names)
                tgt_values, moved = self.observer.capture(self.tgt, self.feeds, names, self.tol)
                raw = [diff_row(self.graph, n, ref_values.pop(n), tgt_values.pop(n), self.tol) for n in names]
        except TargetRunError as exc:
            self.probes.append(Probe(phase, len(names), cut, node, status="failed", error=str(exc)))
            raise
        rows = [self.observer.label(row, moved) for row in raw]
        self.diffs.update((r.tensor, r) for r in rows)
        own = [r for r in rows if judged is None or r.tensor in judged]
        self.probes.append(Probe(phase, len(names), cut, node, any(r.blamed for r in own), any(r.new_nonfinite and r.blamed for r in own),
                                 perturbed=moved.why, swept=len(rows) - len(own), index=self.graph.index_of[node] if node else None))
        if self.progress:
            self.progress(phase, len(self.probes), 0)
        return rows

    def send(self, key: tuple, names: list[str]) -> None:
        """Send the probe of ``names`` to a worker ahead of its turn (no-op serially or if sent already)."""
        if self.executor is not None and key not in self.pending:
            self.pending[key] = self.executor.submit(self.capturable(names))

    def drop(self, keep=lambda key: False) -> None:
        """Discard the probes sent ahead that ``keep`` does not name (their answer is no longer asked)."""
        for key in [k for k in self.pending if not keep(k)]:
            self.executor.discard(self.pending.pop(key))

    def groups(self, groups: list[list[str]], phase: str):
        """Capture ``groups`` in order (yielding each group's rows); on workers they run at once, and
        those after the caller stops are discarded."""
        for i, group in enumerate(groups):
            self.send((phase, i), group)
        try:
            for i, group in enumerate(groups):
                yield group, self.capture(group, phase, ticket=self.pending.pop((phase, i), None))
        finally:
            self.drop(lambda key: key[0] != phase)


class ProbeJob:
    """A bisect probe on a worker (:mod:`aligner.search.executor`): ``job(names)`` -> (diff rows of
    ``names``, how the capture moved the target's outputs), both sides run as :class:`BisectRun` runs
    them; the rows are labelled by the search's own observer."""

    def __init__(self, graph: ModelGraph, other: ModelGraph, feeds: Feeds, target: Target, reference: Target, tol: Tolerance):
        self.graph, self.other, self.feeds, self.target, self.reference, self.tol = graph, other, feeds, target, reference, tol
        self._sides = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _sides=None)

    def __call__(self, names: list[str]):
        if self._sides is None:
            tgt = make_runner(self.other, self.target)
            self._sides = reference_runner(self.graph, self.reference), tgt, Observer.of(tgt, self.other, self.feeds)
        ref, tgt, observer = self._sides
        ref_values = ref.run(self.feeds, names)
        tgt_values, moved = observer.capture(tgt, self.feeds, names, self.tol)
        return [diff_row(self.graph, n, ref_values.pop(n), tgt_values.pop(n), self.tol) for n in names], moved


__all__ = ["BisectRun", "ProbeJob", "Progress"]
