"""Search: bisect to the first divergent node and its root cause; (later) the precision search."""

from aligner.search.bisect import STRATEGIES, bisect
from aligner.search.frontier import bisect_cuts, frontier, spans
from aligner.search.verdict import BisectResult, LocalError, NonfiniteOrigin, Probe, Repro, RootCause

__all__ = ["BisectResult", "LocalError", "NonfiniteOrigin", "Probe", "Repro", "RootCause", "STRATEGIES", "bisect",
           "bisect_cuts", "frontier", "spans"]
