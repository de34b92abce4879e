"""The pin search as library functions over a check: no runtime here.

``check(pins, phase)`` builds and runs the target with ``pins`` kept in FP32 and returns a
:class:`Trial`. The search:

1. tries pure low precision (a model that passes needs no plan: one trial);
2. tries the seeds (nodes the reference's value ranges show cannot live in FP16); while that fails,
   *grows* the set by the trial's culprit (where NaN/inf or the divergence starts); when no new
   culprit is named (the divergence is spread thin, or the bound is stricter than any one node),
   it pins every remaining node at once: if even that fails, no plan exists for this check;
3. *minimises* the passing set by delta debugging (removal by recursive halves, then single pins)
   until removing any one pin makes the check fail: the result is 1-minimal.

A trial that fails to build or run (``error``) never counts as "passes"; it is kept apart in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Trial:
    pins: frozenset[str]
    passed: bool
    phase: str = ""  # "pure", "seed", "grow", "all", "minimize", "final"
    metrics: dict[str, float] = field(default_factory=dict)
    culprit: str | None = None  # where it goes wrong under these pins (for growing)
    error: str = ""  # the target failed to build or run
    seconds: float = 0.0
    reason: str = ""  # why it failed, in words
    worker: str = field(default="", compare=False)  # which worker ran it (aligner.search.executor); not logged


Check = Callable[[frozenset[str], str], Trial]


def grow(seeds: Sequence[str], check: Check, limit: int, universe: Sequence[str] = ()) -> tuple[list[str], Trial, dict[str, int]]:
    """Pins that pass, starting from ``seeds``; adds each failing trial's culprit. When a trial names
    no new culprit (or after ``limit`` culprits), the rest of ``universe`` (every node that could be
    pinned, in topological order) is pinned at once, so growing ends either passing or with every
    node pinned (then nothing can pass). A trial that fails to build or run stops it. Returns the
    pins (in ``universe`` order after pinning the rest), the last trial, and for each grown pin the
    number of the step that named it."""
    pins = list(dict.fromkeys(seeds))
    grown: dict[str, int] = {}
    trial = check(frozenset(pins), "seed")
    while not trial.passed and not trial.error:
        if trial.culprit and trial.culprit not in pins and len(grown) < limit:
            grown[trial.culprit] = len(grown)
            pins.append(trial.culprit)
            trial = check(frozenset(pins), "grow")
            continue
        if set(universe) <= set(pins):
            break
        # Everything, in topological order, so minimisation's halves are regions of the graph.
        pins = list(dict.fromkeys(universe)) + [p for p in pins if p not in set(universe)]
        trial = check(frozenset(pins), "all")
    return pins, trial, grown


def minimize(pins: Sequence[str], check: Check, halve_above: int = 128, ahead: Ahead | None = None) -> list[str]:
    """Delta debugging over a passing pin set: a subset that still passes and from which no single
    pin can be removed (1-minimal).

    Seeds come from evidence and are mostly necessary, so each one is simply tried without (one
    trial per pin, the least a proof of 1-minimality needs) — unless the set is sparse (more than
    ``halve_above`` pins, or dropping its first half already passes): then it is first thinned by
    recursive halves (adaptive group testing): a chunk whose removal still passes is dropped
    whole, one that fails is split. Every kept pin is then re-checked against
    the final set (the check need not be monotone), so the result is 1-minimal by construction.

    Before each trial, ``ahead`` (if given) is told the pin sets the search will check next if this
    trial and those after it all fail (the set does not change while trials fail), so that a
    parallel executor can run them at once; the trials checked, their order and the result are
    those of the serial search whatever ``ahead`` does.
    """
    current = list(pins)
    look = ahead or (lambda sets: None)

    def drop(chunks: list[list[str]], later: Sequence[list[str]] = ()) -> None:
        """Remove each chunk in turn if the rest passes, else its halves (depth first, first half
        first); ``later`` are the chunks the caller drops next (only looked ahead at)."""
        nonlocal current
        stack = [list(c) for c in reversed(chunks)]
        while stack:
            chunk = [p for p in stack.pop() if p in current]
            if not chunk:
                continue
            look(_halving_ahead(current, chunk, stack, later))
            rest = [p for p in current if p not in set(chunk)]
            if check(frozenset(rest), "minimize").passed:
                current = rest
            elif len(chunk) > 1:
                mid = len(chunk) // 2
                stack += [chunk[mid:], chunk[:mid]]

    mid = len(current) // 2
    # Sparse (many seeds, or dropping the first half already passes): thin by halves first.
    sparse = len(current) > halve_above
    if not sparse and len(current) > 3:
        look(_chain([frozenset(current[mid:])], _removals_ahead(current, current, False)))
        sparse = check(frozenset(current[mid:]), "minimize").passed
    if sparse:
        first, second = current[:mid], current[mid:]  # both halves of the set as it was (mid is not an index of what is left)
        drop([first], later=[second])
        drop([second])
    changed = True
    while changed:  # 1-minimal against the final set, whatever the check's monotonicity
        changed = False
        snapshot = list(current)
        for i, pin in enumerate(snapshot):
            look(_removals_ahead(current, snapshot[i:], changed))
            if check(frozenset(p for p in current if p != pin), "minimize").passed:
                current = [p for p in current if p != pin]
                changed = True
    return current


Ahead = Callable[[Iterator[frozenset[str]]], None]


def _chain(*parts: Iterable[frozenset[str]]) -> Iterator[frozenset[str]]:
    for part in parts:
        yield from part


def _halving_ahead(current: list[str], chunk: list[str], stack: list[list[str]], later: Sequence[list[str]]) -> Iterator[frozenset[str]]:
    """The removals :func:`minimize`'s halving checks from ``chunk`` on while every check fails."""
    stack = [list(c) for c in reversed(later)] + [list(c) for c in stack]
    while True:
        yield frozenset(p for p in current if p not in set(chunk))
        if len(chunk) > 1:
            mid = len(chunk) // 2
            stack += [chunk[mid:], chunk[:mid]]
        chunk = []
        while stack and not chunk:
            chunk = [p for p in stack.pop() if p in current]
        if not chunk:
            return


def _removals_ahead(current: list[str], rest: Sequence[str], changed: bool) -> Iterator[frozenset[str]]:
    """The single removals :func:`minimize` checks from ``rest[0]`` on while every check fails: the
    rest of this pass, then (when this pass removed a pin already) the next pass."""
    for pin in rest:
        yield frozenset(p for p in current if p != pin)
    if changed:
        for pin in current:
            yield frozenset(p for p in current if p != pin)


def thin(pins: Sequence[str], check: Check, ahead: Ahead | None = None, probe: bool = True) -> list[str]:
    """A 1-minimal subset of a passing pin set, removing *blocks* of pins where they can go: for a set
    where most pins are unnecessary a removal pass costs about log2 of its size in trials, where most
    are necessary about one trial per pin (what the proof of 1-minimality needs anyway).

    ``pins`` are in the order to try them (likeliest to go first). ``probe``: first try without the
    first half. Then each pass walks the set in blocks whose size follows the outcomes so far
    (:class:`_Thinning`: large while removals pass, single pins once they mostly fail); a block whose
    removal fails is split in halves, each tried in turn, down to single pins. A pin stays when its
    removal alone fails. Passes repeat until one removes nothing — then every kept pin's removal
    failed against the final set (the check need not be monotone), so the result is 1-minimal.

    ``ahead`` (if given) is told, before each trial, the pin sets the search checks next supposing
    each coming trial ends as the last one did (blocks grow while removals pass, shrink to single
    pins while they fail), so that a parallel executor can run them at once; the trials checked,
    their order and the result are the serial search's whatever ``ahead`` does."""
    state = _Thinning(pins, probe)
    last = False
    while (block := state.next()) is not None:
        if ahead is not None:
            ahead(state.upcoming(block, last))
        last = check(frozenset(state.without(block)), "minimize").passed
        state.apply(block, last)
    return state.current


class _Thinning:
    """The state of :func:`thin`: the set, this pass's order and position, the blocks split from a
    failed removal (depth first, first half first), and the counts the block size is chosen from."""

    def __init__(self, pins: Sequence[str], probe: bool):
        self.current = list(dict.fromkeys(pins))
        self.removed = self.kept = self.failed = 0
        self.streak = 0  # removals that passed in a row (+) or failed in a row (-)
        self.probe = probe and len(self.current) > 3
        self.order = None
        self._pass()

    def _pass(self) -> None:
        if self.order is not None:  # a later pass: its pins all failed alone (or were never
            self.removed = self.kept = self.failed = self.streak = 0  # tried alone): start at single pins, grow on success
        self.order, self.i, self.stack, self.changed, self.probing = list(self.current), 0, [], False, False

    def copy(self) -> "_Thinning":
        other = object.__new__(_Thinning)
        other.__dict__.update({k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()})
        other.stack = [list(b) for b in self.stack]
        return other

    def size(self) -> int:
        """Generalised binary splitting (Hwang): blocks of about (pins that go) / (pins that stay), from
        the counts so far and the recent run of outcomes (removable pins cluster: the least ranked go)."""
        goes = (self.removed + 1) / (self.removed + self.kept + self.failed + 2)
        ratio = goes / (1 - goes) * 2.0 ** max(-30, min(30, self.streak))
        b = 1
        while 2 * b <= ratio:
            b *= 2
        return max(1, min(b, len(self.order) - self.i))

    def next(self) -> list[str] | None:
        inside = set(self.current)
        while True:
            while self.stack:
                block = [p for p in self.stack.pop() if p in inside]
                if block:
                    return block
            if self.probe:
                self.probe, self.probing = False, True
                return self.current[:len(self.current) // 2]
            if self.i < len(self.order):
                b = self.size()
                block = [p for p in self.order[self.i:self.i + b] if p in inside]
                self.i += b
                if block:
                    return block
                continue
            if not self.changed:
                return None
            self._pass()

    def without(self, block: Sequence[str]) -> list[str]:
        drop = set(block)
        return [p for p in self.current if p not in drop]

    def apply(self, block: list[str], passed: bool) -> None:
        if passed:
            self.current = self.without(block)
            self.removed += len(block)
            self.changed = True
            self.streak = max(self.streak, 0) + 1
        else:
            self.streak = min(self.streak, 0) - 1
            if len(block) == 1:
                self.kept += 1
            else:
                self.failed += 1
                if not self.probing:  # the probe's failure says nothing of single pins: the pass starts over in blocks
                    mid = len(block) // 2
                    self.stack += [block[mid:], block[:mid]]
        self.probing = False

    def upcoming(self, block: list[str], last: bool, count: int = 16) -> Iterator[frozenset[str]]:
        """The sets :func:`thin` checks from ``block`` on, supposing each check ends as ``last`` did."""
        sim = self.copy()
        for _ in range(count):
            yield frozenset(sim.without(block))
            sim.apply(block, last)
            block = sim.next()
            if block is None:
                return


def search_pins(seeds: Sequence[str], check: Check, grow_limit: int = 64,
                universe: Sequence[str] = (), ahead: Ahead | None = None) -> tuple[list[str], Trial | None]:
    """Pure low precision first, then seeds + growth (up to every node of ``universe``), then
    minimisation. Returns (pins, the trial that verifies them) or (pins tried last, None) when
    nothing passed. ``ahead``: see :func:`minimize` (here also told the seeds' trial while pure
    low precision runs)."""
    if ahead is not None and seeds:
        ahead(iter([frozenset(), frozenset(dict.fromkeys(seeds))]))
    pure = check(frozenset(), "pure")
    if pure.passed:
        return [], pure
    start = list(seeds)
    if not start and pure.culprit:
        start = [pure.culprit]
    pins, trial, _ = grow(start, check, grow_limit, universe)
    if not trial.passed:
        return pins, None
    pins = minimize(pins, check, halve_above=0 if trial.phase == "all" else 128, ahead=ahead)  # from everything: thin by halves
    return pins, check(frozenset(pins), "final")


__all__ = ["Ahead", "Check", "Trial", "grow", "minimize", "search_pins", "thin"]
