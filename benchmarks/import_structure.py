"""The package's import structure: import circles and arrows that run back up the floors.

    python benchmarks/import_structure.py

Reads every module's imports with ``ast`` (module-level and inside functions; ``if TYPE_CHECKING``
blocks left out) and prints: the circles among modules counting every import, the circles among
module-level imports alone (which Python itself would trip over), and each import from a lower
floor to a higher one. Floors, bottom up: errors/_optional/version/limits/inputs, graph, backends,
quant, compare, search, eval, report, the top-level workflows (bench, build, tune, doctor), cli.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "aligner"
FLOORS = [("aligner.errors", "aligner._optional", "aligner.version", "aligner.limits", "aligner.inputs"), ("aligner.graph",),
          ("aligner.backends",), ("aligner.quant",), ("aligner.compare",), ("aligner.search",), ("aligner.eval",),
          ("aligner.report",), ("aligner.bench", "aligner.build", "aligner.tune", "aligner.doctor", "aligner.plugin", "aligner.passes",
                                "aligner.examples"), ("aligner.cli",)]


def floor(module: str) -> int:
    for i, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return len(FLOORS)  # the package itself (aligner/__init__: the public API, above everything)


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    top, every = defaultdict(set), defaultdict(set)
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if node.module else []
            for name in names:
                if not name.startswith("aligner"):
                    continue
                target = resolve(name)
                if target and target != module:
                    every[module].add(target)
                    if node in tree.body:
                        top[module].add(target)
    return top, every


def circles(edges: dict[str, set[str]], nodes) -> list[list[str]]:
    sys.setrecursionlimit(10000)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in nodes:
        if v not in index:
            strong(v)
    return out


def main() -> None:
    mods = modules()
    top, every = imports(mods)
    every_circles, top_circles = circles(every, mods), circles(top, mods)
    print(f"| modules | imports | import circles (every import) | circles (module-level imports) | arrows up |")
    up = sorted((m, t) for m, ts in every.items() for t in ts if floor(m) < floor(t) and m != "aligner")
    print(f"| {len(mods)} | {sum(map(len, every.values()))} | {len(every_circles)} | {len(top_circles)} | {len(up)} |\n")
    for group in every_circles:
        print(f"circle of {len(group)}: {', '.join(group)}")
    for m, t in up:
        print(f"arrow up: {m} -> {t}")


if __name__ == "__main__":
    main()
