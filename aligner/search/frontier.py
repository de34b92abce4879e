"""Search over the topological order, as library functions over a predicate (no runtime here).

A *cut* ``k`` splits an order of ``n`` nodes after its first ``k`` nodes. Its *frontier* is the
set of tensors produced before the cut and still needed after it (read by a later node, or a
graph output): everything the rest of the model depends on. ``diverges(k)`` asks whether any
frontier tensor at cut ``k`` differs between reference and target; cut 0 (the graph inputs)
never diverges.

If ``diverges(k-1)`` is false and ``diverges(k)`` is true, node ``k-1`` read only matching
tensors (its inputs are all on frontier ``k-1``) and wrote a diverging one: it is where the
divergence starts, whatever happens elsewhere. Binary search finds such a transition in
⌈log2 n⌉ probes once ``diverges(n)`` (the graph outputs) is known to be true, even when a later
node masks the error (the predicate need not be monotone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A tensor's life in the order: written by node ``produced`` (-1 for graph inputs), last
    needed by node ``last_use`` (``n`` for graph outputs)."""

    tensor: str
    produced: int
    last_use: int


def spans(order: Sequence[tuple[Sequence[str], Sequence[str]]], graph_outputs: Sequence[str]) -> list[Span]:
    """Life spans of the tensors written by ``order`` (a list of (inputs, outputs) per node)."""
    n = len(order)
    produced: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, (inputs, outputs) in enumerate(order):
        for name in inputs:
            if name in produced:
                last[name] = i
        for name in outputs:
            if name:
                produced[name] = i
    for name in graph_outputs:
        if name in produced:
            last[name] = n
    return [Span(t, p, last[t]) for t, p in produced.items() if t in last]


def frontier(lives: Sequence[Span], cut: int) -> list[str]:
    """Tensors crossing ``cut``: written before it, needed at or after it."""
    return [s.tensor for s in lives if s.produced < cut <= s.last_use]


def bisect_cuts(n: int, diverges: Callable[[int], bool], known: dict[int, bool] | None = None, top: int | None = None,
                ahead: Callable[[list[int]], None] | None = None, width: int = 1) -> int | None:
    """The node where a divergence starts: index ``k-1`` with ``diverges(k-1)`` false and
    ``diverges(k)`` true, or None when the graph outputs (cut ``n``) do not diverge.

    ``known`` caches answers (cut -> diverged) across searches; cut 0 is false by definition.
    ``top``: a cut already known to diverge, searched below instead of cut ``n``.
    Costs one call for cut ``n`` (unless known) plus at most ⌈log2 n⌉.

    ``ahead`` (if given) is told, before each call, the cuts the search may ask next — the levels of
    its decision tree below the current range, the next one first, ``width`` of them — so that a
    caller with ``width`` workers can probe them at once (a k-ary search); the cuts asked and the
    answer are the binary search's whatever ``ahead`` does.
    """
    known = known if known is not None else {}
    known.setdefault(0, False)

    def ask(k: int) -> bool:
        if k not in known:
            known[k] = bool(diverges(k))
        return known[k]

    top = n if top is None else top
    if ahead is not None and n and top not in known:
        below = max(k for k, v in known.items() if not v and k < top)
        ahead([top, *next_cuts(below, top, width - 1)])
    if n == 0 or not ask(top):
        return None
    lo = max(k for k, v in known.items() if not v and k < top)
    hi = min(k for k, v in known.items() if v and lo < k <= top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ahead is not None:
            ahead(next_cuts(lo, hi, width))
        if ask(mid):
            hi = mid
        else:
            lo = mid
    return hi - 1


def next_cuts(lo: int, hi: int, width: int) -> list[int]:
    """The cuts a binary search over (``lo``, ``hi``) may probe, level by level (its next probe
    first, then both it may probe after that, ...): the first ``width``."""
    out: list[int] = []
    level = [(lo, hi)]
    while level and len(out) < width:
        deeper = []
        for a, b in level:
            if b - a > 1:
                mid = (a + b) // 2
                out.append(mid)
                deeper += [(a, mid), (mid, b)]
        level = deeper
    return out[:max(width, 0)]


def first_true(flags: Sequence[bool]) -> int | None:
    """Index of the first true flag (the ``all`` strategy: every tensor compared at once)."""
    return next((i for i, f in enumerate(flags) if f), None)


__all__ = ["Span", "bisect_cuts", "first_true", "frontier", "next_cuts", "spans"]
