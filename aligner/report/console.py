"""Console tables that read at any width (80-column CI logs, pipes): names elided in the middle,
never wrapped letter by letter; the full names stay in the JSON/CSV outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # pragma: no cover
    from aligner.search.executor import ExecutorStats

ELLIPSIS = "…"
NAME_HEADERS = ("node", "tensor", "target", "module", "first divergent", "last node before the cut")
MIN_NAME = 12  # below this a name no longer tells nodes apart: the table wraps other columns instead


def elide(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by dropping its middle: ``/encoder/lay…/ReduceMean_1``
    (a node's path prefix and its distinctive tail both stay)."""
    if len(text) <= width or width < 3:
        return text
    tail = (width - 1) // 2 + (width - 1) % 2
    return text[: width - 1 - tail] + ELLIPSIS + text[len(text) - tail:]


def fit_table(console: Console, table: Table, headers: tuple[str, ...] = NAME_HEADERS) -> Table:
    """Make ``table`` fit ``console.width``: its name columns (by header) never wrap; their cells are
    elided in the middle, longest first, until the table's narrowest layout fits (other columns may
    still wrap at spaces). Returns the table, changed in place."""
    columns = [c for c in table.columns if str(c.header) in headers]
    for column in columns:
        column.no_wrap, column.overflow, column.ratio = True, "ellipsis", None
    width = max((_longest(c) for c in columns), default=0)
    cap = max(MIN_NAME, int(console.width * 0.45))  # room left for the columns that explain the name
    while columns and width > MIN_NAME and (width > cap or _narrowest(table) > console.width):
        width = max(MIN_NAME, min(width - 2, cap))
        for column in columns:
            column._cells = [_elided(cell, width) for cell in column._cells]  # rich keeps a column's cells here
    return table


def _narrowest(table: Table) -> int:
    """The width of ``table`` with every wrapping column at its longest word and every no-wrap
    column whole (rich would cut those, not wrap them)."""
    total = 0
    for column in table.columns:
        texts = [_text(column.header)] + [_text(c) for c in column._cells]
        if column.no_wrap:
            need = max(cell_len(t.plain) for t in texts)
        else:
            need = max((cell_len(word) for t in texts for word in t.plain.split()), default=1)
        total += max(need, column.min_width or 0) + 2  # padding (0, 1)
    return total + (len(table.columns) + 1 if table.box else 0)


def _longest(column) -> int:
    return max((len(_plain(c)) for c in column._cells), default=0)


def _text(cell) -> Text:
    return cell if isinstance(cell, Text) else Text.from_markup(str(cell))  # cells are rich markup (names escaped)


def _plain(cell) -> str:
    return _text(cell).plain


def _elided(cell, width: int):
    text = _text(cell)
    return cell if len(text.plain) <= width else Text(elide(text.plain, width), style=text.style)


def print_workers(stats: "ExecutorStats", what: str, console: Console | None = None) -> None:
    """With several workers: each one's share and the speed-up over running the same tasks one after
    another (worker seconds of the results used / wall seconds)."""
    if len(stats.workers) <= 1:
        return
    console = console or Console(stderr=True, highlight=False)
    shares = ", ".join(f"{w.name} {w.tasks} in {w.seconds:.1f} s" + (f" ({w.crashed} crashed)" if w.crashed else "") for w in stats.workers)
    console.print(f"workers ({stats.kind}): {shares}; {stats.used_seconds:.1f} s of {what}s used in {stats.wall:.1f} s wall: "
                  f"~{stats.speedup():.2f}x over one at a time" + (f"; {stats.wasted} speculative {what}(s) not needed" if stats.wasted else ""))


__all__ = ["elide", "fit_table", "print_workers"]
