"""One question, one answer (issue 15): compare and every bisect strategy agree.

Each case asks the same question — model, inputs, target, tolerance — of ``compare`` and of
``bisect`` with every strategy (all, frontier, auto, isolate), through the library and through the
command line, and asserts that they give the same verdict (diverged or not), the same first
divergent node and the same tolerance; that all/auto/isolate name the same root cause; and, where
the fault's location is known, that the node named is the one a user should fix. A failure prints a
table of what each command said.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import aligner
from aligner.cli.main import main
from aligner.graph.model import ModelGraph
from consistency_cases import CASES, Case, Library, Question

STRATEGIES = ("all", "frontier", "auto", "isolate")
ROOT_CAUSE_STRATEGIES = ("all", "auto", "isolate")  # the strategies that isolate nodes to name a root cause


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Library:
    return Library(tmp_path_factory.mktemp("consistency"))


@dataclass(frozen=True)
class Answer:
    """What one command said."""

    command: str
    diverged: bool | None = None
    first: str | None = None  # first divergent node
    root: str | None = None  # root cause node
    kind: str | None = None  # root cause kind
    tolerance: dict | None = None  # {metric, threshold, atol}; None: not recorded
    outputs_diverge: bool | None = None
    exit_code: int | None = None  # CLI only
    error: str = ""


def _tolerance(tol) -> dict | None:
    if tol is None:
        return None
    if isinstance(tol, dict):
        return {k: tol.get(k) for k in ("metric", "threshold", "atol")}
    return {k: getattr(tol, k, None) for k in ("metric", "threshold", "atol")}


# ---- asking: the library ---------------------------------------------------------------------

def ask_library(question: Question) -> list[Answer]:
    answers = []
    outputs = set(ModelGraph.load(question.model).output_names)
    try:
        result = aligner.compare(**question.kwargs())
        first = result.first_divergent
        answers.append(Answer("compare", first is not None, first.node if first else None, tolerance=_tolerance(result.tolerance),
                              outputs_diverge=any(t.diverges for t in result.tensors if t.tensor in outputs)))
    except Exception as exc:  # a crash is an answer too: it shows in the table
        answers.append(Answer("compare", error=f"{type(exc).__name__}: {exc}"))
    for strategy in STRATEGIES:
        try:
            result = aligner.bisect(**question.kwargs(), strategy=strategy)
        except Exception as exc:
            answers.append(Answer(strategy, error=f"{type(exc).__name__}: {exc}"))
            continue
        first, cause = result.first_divergent, result.root_cause
        answers.append(Answer(strategy, result.diverged, first.node if first else None, cause.node if cause else None,
                              cause.kind if cause else None, _tolerance(getattr(result, "tolerance", None)),
                              getattr(result, "outputs_diverge", None), error=getattr(result, "failed", "") or ""))
    return answers


# ---- asking: the command line ----------------------------------------------------------------

def _in_process(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    _, err = capsys.readouterr()
    return code, err


def _subprocess(argv: list[str], capsys) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", *argv], capture_output=True, text=True)
    return proc.returncode, proc.stderr


def ask_cli(question: Question, workdir: Path, extra: list[str], capsys, invoke=_in_process) -> list[Answer]:
    """``aligner compare`` and ``aligner bisect`` (default strategy, then each --strategy) with --json."""
    workdir.mkdir(parents=True, exist_ok=True)
    feeds = workdir / "inputs.npz"
    np.savez(feeds, **question.feeds)
    base = question.argv(feeds) + extra
    answers = []
    runs = [("compare", ["compare"])] + [(s, ["bisect"] + ([] if s == "auto" else ["--strategy", s])) for s in STRATEGIES]
    for label, verb in runs:
        out = workdir / f"{label}.json"
        code, err = invoke(verb + base + ["--json", str(out), "--force"], capsys)
        if not out.exists():
            answers.append(Answer(label if label != "auto" else "auto (default)", exit_code=code, error=err.strip()[-300:] or "no JSON written"))
            continue
        doc = json.loads(out.read_text())
        answers.append(_from_json(label, doc, code))
    return answers


def _from_json(label: str, doc: dict, code: int) -> Answer:
    if label == "compare":
        first = (doc.get("summary") or {}).get("first_divergent")
        return Answer("compare", first is not None, first["node"] if first else None, tolerance=_tolerance(doc.get("tolerance")), exit_code=code)
    first, cause = doc.get("first_divergent"), doc.get("root_cause")
    return Answer(label if label != "auto" else "auto (default)", bool(doc.get("diverged", code == 1)), first["node"] if first else None,
                  cause["node"] if cause else None, cause["kind"] if cause else None, _tolerance(doc.get("tolerance")),
                  doc.get("outputs_diverge"), code)


# ---- judging ---------------------------------------------------------------------------------

def disagreements(answers: list[Answer], case: Case) -> list[str]:
    """Everything that is not the same answer to the same question, or not the known answer."""
    problems = [f"{a.command} failed: {a.error}" for a in answers if a.error]
    ref = answers[0]
    if ref.error:
        return problems
    for a in answers[1:]:
        if a.error:
            continue
        if a.diverged != ref.diverged:
            problems.append(f"{a.command} says diverged={a.diverged}, compare says {ref.diverged}")
        if a.first != ref.first:
            problems.append(f"{a.command} names first divergent node {a.first!r}, compare {ref.first!r}")
        if a.tolerance is None:
            problems.append(f"{a.command} does not record its tolerance")
        elif a.tolerance != ref.tolerance:
            problems.append(f"{a.command} judged with tolerance {a.tolerance}, compare with {ref.tolerance}")
        if a.exit_code is not None and ref.exit_code is not None and a.exit_code != ref.exit_code:
            problems.append(f"{a.command} exits {a.exit_code}, compare exits {ref.exit_code}")
        if a.outputs_diverge is not None and ref.outputs_diverge is not None and a.outputs_diverge != ref.outputs_diverge:
            problems.append(f"{a.command} says the outputs diverge={a.outputs_diverge}, compare says {ref.outputs_diverge}")
    causes = [a for a in answers if a.command.split()[0] in ROOT_CAUSE_STRATEGIES and not a.error]
    if len({(a.root, a.kind) for a in causes}) > 1:
        problems.append("root causes differ: " + ", ".join(f"{a.command} {a.root} ({a.kind})" for a in causes))
    if ref.diverged:
        problems += [f"{a.command} diverged but names no root cause" for a in causes if a.diverged and a.root is None]
    # the known answer
    if case.diverges is not None and ref.diverged != case.diverges:
        problems.append(f"expected diverged={case.diverges} (known), compare says {ref.diverged}")
    if case.culprit is not None:
        if ref.first != case.culprit:
            problems.append(f"the fault is at {case.culprit!r}; compare names {ref.first!r} first")
        problems += [f"the fault is at {case.culprit!r}; {a.command}'s root cause is {a.root!r}" for a in causes if a.root != case.culprit]
    if case.kind is not None:
        problems += [f"expected root cause kind {case.kind!r}; {a.command} says {a.kind!r}" for a in causes if a.kind != case.kind]
    if case.fault == "masked" and ref.outputs_diverge:
        problems.append("premise: the fault was meant to be masked, but compare finds the graph outputs diverge")
    return problems


def table(case_id: str, question: Question, answers: list[Answer], problems: list[str]) -> str:
    head = f"{case_id}: {question.model.name} on {question.target}" + (f" vs --target-model {question.target_model.name}" if question.target_model else "")
    cols = ("command", "exit", "diverged", "outputs", "first divergent node", "root cause (kind)", "tolerance")
    rows = [cols]
    for a in answers:
        tol = "-" if a.tolerance is None else f"{a.tolerance['metric']}>{a.tolerance['threshold']:g} atol {a.tolerance['atol']:g}"
        cause = "-" if a.root is None else f"{a.root} ({a.kind})"
        rows.append((a.command, "-" if a.exit_code is None else str(a.exit_code),
                     "ERROR" if a.error else {True: "yes", False: "no", None: "-"}[a.diverged],
                     {True: "diverge", False: "match", None: "-"}[a.outputs_diverge], a.first or "-", cause, tol))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + ["disagreements:"] + [f"  - {p}" for p in problems])


# ---- the library: every case ------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compare_and_every_strategy_agree(case, library):
    question = library.question(case)
    answers = ask_library(question)
    problems = disagreements(answers, case)
    assert not problems, "\n" + table(case.id, question, answers, problems)


# ---- the command line --------------------------------------------------------------------------

def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


CLI_CASES = {
    # the cases: the demo detector on its own inputs (bisect with the default strategy); the
    # ViT as its own --target-model on ort:cpu:fp16; --atol alone; a masked divergence
    "detector-emu_fp16-masked": (_case("detector-emu_fp16-masked"), []),
    "vit-model2-fp16-same-file": (_case("vit-model2-fp16-same-file"), []),
    "vit-model2-fp16-local-atol": (Case("vit", "ort:cpu:fp16", "local", two_model=True), ["--atol", "1e-3"]),
    "jax-model2-fp32-masked": (_case("jax-model2-fp32-masked"), []),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_compare_and_bisect_agree(name, library, tmp_path, capsys):
    case, extra = CLI_CASES[name]
    question = library.question(case)
    answers = ask_cli(question, tmp_path, extra, capsys)
    problems = disagreements(answers, case)
    assert not problems, "\n" + table(name, question, answers, problems)


def test_cli_atol_alone_changes_only_atol(library, tmp_path, capsys):
    """--atol alone keeps the default metric and threshold of the target, in compare and in bisect."""
    question = library.question(Case("vit", "ort:cpu:fp16", "local", two_model=True))
    np.savez(tmp_path / "in.npz", **question.feeds)
    base = question.argv(tmp_path / "in.npz")
    said = {}
    for label, argv in (("compare", ["compare"]), ("compare --atol 1e-3", ["compare", "--atol", "1e-3"]),
                        ("bisect --atol 1e-3", ["bisect", "--atol", "1e-3"])):
        out = tmp_path / f"{label.replace(' ', '_')}.json"
        _in_process(argv + base + ["--json", str(out)], capsys)
        said[label] = _tolerance(json.loads(out.read_text()).get("tolerance")) if out.exists() else None
    default = said["compare"]
    expected = None if default is None else {**default, "atol": 1e-3}
    lines = [f"  {k}: {v}" for k, v in said.items()]
    assert said["compare --atol 1e-3"] == expected and said["bisect --atol 1e-3"] == expected, \
        f"\n--atol 1e-3 alone should give {expected} (the default rule with atol 1e-3):\n" + "\n".join(lines)


def test_cli_detector_on_ort_fp16_every_command_answers(library, tmp_path):
    """The demo detector on ORT CPU FP16, each command in its own process. Its deployed FP16 graph
    crashes ONNX Runtime's CPU optimizer (a segmentation fault, issue 20): every command must give
    the same answer — exit 3 and a message naming the crash, no traceback, no verdict. Should a future
    ONNX Runtime not crash, the commands must agree as on every other case."""
    case = Case("detector", "ort:cpu:fp16", "none")
    question = library.question(case)
    np.savez(tmp_path / "inputs.npz", **question.feeds)
    base = question.argv(tmp_path / "inputs.npz")
    said = {}
    for label, verb in [("compare", ["compare"])] + [(s, ["bisect", "--strategy", s]) for s in STRATEGIES]:
        proc = subprocess.run([sys.executable, "-m", "aligner.cli.main", *verb, *base, "--json", str(tmp_path / f"{label}.json")],
                              capture_output=True, text=True)
        said[label] = (proc.returncode, "crashed" in proc.stdout + proc.stderr, "Traceback" in proc.stderr)
    lines = "\n".join(f"  {k}: exit {c}, names the crash: {crash}, traceback: {tb}" for k, (c, crash, tb) in said.items())
    assert not any(tb for _, _, tb in said.values()), lines
    codes = {c for c, _, _ in said.values()}
    assert len(codes) == 1, "commands disagree:\n" + lines
    if codes == {3}:
        assert all(crash for _, crash, _ in said.values()), lines
