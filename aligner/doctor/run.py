"""The steps of ``aligner doctor`` (:mod:`aligner.doctor`), one method each, and the function that runs them."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from aligner.backends.registry import backend_of
from aligner.backends.target import REFERENCE, Target
from aligner.doctor.result import DoctorResult, OnStep, Progress, Status, Step, StepError
from aligner.doctor.task import CocoEval
from aligner.errors import InputError, MissingDependencyError, TargetError, TargetRunError
from aligner.graph.model import ModelGraph
from aligner.inputs import save_inputs, write_atomic
from aligner.search.bisect import Strategy


def doctor(model: ModelGraph | str | Path, target: str | Target, out: str | Path,
           feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
           reference: str = REFERENCE, bench_runs: int = 20, progress: Progress | None = None,
           inputs: str | Path | None = None, task: CocoEval | None = None, strategy: Strategy = "auto",
           on_step: OnStep | None = None) -> DoctorResult:
    """Run the pipeline (module docstring) for ``target`` on ``feeds`` (one sample, or a list of
    samples: precision searches on all, the other steps run the first; ``inputs`` names the file or
    folder they came from, for the report), writing under ``out`` (the caller checks it may).
    ``task``: a task metric (:class:`~aligner.doctor.task.CocoEval`) for the plan's acceptance and the
    eval step; without ``feeds`` its first batch of images is fed. ``strategy``: bisect's.
    ``bench_runs`` 0 skips the bench step. ``progress`` gets a line as each step starts and ends;
    ``on_step`` each finished step with its typed result. Returns what each step found; raises
    :class:`StepError` when a step's target cannot run here."""
    graph = model if isinstance(model, ModelGraph) else ModelGraph.load(model)
    target = Target.parse(target)
    if not backend_of(target).runs_onnx:
        raise InputError(f"aligner doctor runs the ONNX model on its target; {target} runs a PyTorch module. Compare the module "
                         "with: aligner compare model.onnx --torch MODULE:FUNCTION --target torch:cpu:fp32")
    if feeds is None and task is not None:
        feeds, inputs = task.feeds(graph), inputs or task.source()
    if feeds is None:
        raise InputError("doctor needs input samples (feeds), or a task metric whose images it feeds.")
    samples = [dict(feeds)] if isinstance(feeds, Mapping) else [dict(s) for s in feeds]
    if not samples:
        raise InputError("doctor needs at least one input sample.")
    run = _Run(graph, target, Path(out), samples, reference, progress or (lambda n, s, m: None), str(inputs) if inputs else None)
    run.bench_runs, run.task, run.strategy, run.on_step = bench_runs, task, strategy, on_step
    run.out.mkdir(parents=True, exist_ok=True)
    save_inputs(samples[:1], run.out / "inputs.npz", force=True)
    if len(samples) > 1:
        for i, sample in enumerate(samples):
            save_inputs([sample], run.out / "samples" / f"{i:04d}.npz", force=True)
    run.inspect()
    result = run.compare()
    diverged = result.first_divergent is not None or bool(getattr(result, "failed", "")) or bool(run.task_miss)
    fixed = pins = None
    plan = None
    if diverged:
        run.bisect()
        plan = run.precision()
        build = run.build(plan if plan.passed else None)
        fixed, pins = bool(plan.passed and (build is None or build.passed)), len(plan.pins)
    else:
        run.skip("bisect", "the target agrees with the reference: nothing to locate")
        run.skip("precision", "no node needs to stay in FP32")
        run.build(None)
    run.evaluate(plan)
    if bench_runs > 0:
        run.bench()
    else:
        run.skip("bench", "not asked for (bench_runs 0)")
    report = run.report()
    doc = DoctorResult(str(graph.path or "<in-memory>"), str(target), str(run.out), tuple(run.steps), diverged, fixed, report, pins,
                       run.residual)
    write_atomic(run.out / "doctor.json", json.dumps(doc.to_dict(), indent=1).encode())
    return doc


class _Run:
    """The state one doctor run carries from step to step."""

    def __init__(self, graph: ModelGraph, target: Target, out: Path, samples: list[dict], reference: str, progress: Progress,
                 source: str | None = None):
        self.graph, self.target, self.out, self.reference, self.say = graph, target, out, reference, progress
        self.samples, self.feeds, self.source = samples, samples[0], source
        self.model = shlex.quote(str(graph.path))
        self.inputs = shlex.quote(str(out / "inputs.npz"))
        self.all_inputs = ["--inputs-dir", shlex.quote(str(out / "samples"))] if len(samples) > 1 else ["--inputs", self.inputs]
        self.steps: list[Step] = []
        self.runs: list[Path] = []
        self.plan_path: Path | None = None
        self.residual = ""  # what still diverges inside with a passing plan (see _residual)
        self.task: CocoEval | None = None
        self.strategy: Strategy = "auto"
        self.on_step: OnStep | None = None
        self.task_miss = ""  # with a task metric: why the pure target fails it, when its outputs on the feeds do not diverge

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def number(self) -> int:
        return len(self.steps) + 1

    def _do(self, name: str, command: str, what: str, work: Callable[[], tuple[Status, str, tuple[str, ...], object]],
            fatal: bool = True):
        """Run one step; ``command`` re-runs it alone."""
        self.say(self.number, name, what)
        start = time.perf_counter()
        try:
            status, summary, outputs, value = work()
        except (TargetError, TargetRunError, MissingDependencyError) as exc:
            if fatal:
                raise StepError(self.number, name, exc, command, self.out) from None
            status, summary, outputs, value = "failed", str(exc), (), None
        step = Step(name, status, summary, command, outputs, round(time.perf_counter() - start, 2))
        self.steps.append(step)
        self.say(step_number := len(self.steps), name, f"{status}: {summary} ({step.seconds:.1f} s)")
        if command:
            self.say(step_number, name, f"re-run alone: {command}")
        if self.on_step is not None:
            self.on_step(step, value)
        return value

    def skip(self, name: str, why: str) -> None:
        step = Step(name, "skipped", why)
        self.steps.append(step)
        self.say(len(self.steps), name, f"skipped: {why}")
        if self.on_step is not None:
            self.on_step(step, None)

    def _write_run(self, kind: str, doc: dict, trials: Path | None = None) -> Path:
        from aligner.report import write_run

        from aligner.inputs import inputs_summary

        given = self.samples if kind == "precision" else self.samples[:1]
        path = write_run(self.out / "runs" / kind, kind, self.graph, doc, trials, force=True, inputs=inputs_summary(given, self.source))
        self.runs.append(path)
        return path

    def _cmd(self, *words: str) -> str:
        return " ".join(["aligner", *words])

    # -- the steps ---------------------------------------------------------------------------------
    def inspect(self) -> None:
        from aligner.graph.risk import fp16_risks

        def work():
            risks = fp16_risks(self.graph)
            doc = {"nodes": len(self.graph.nodes), "opset": self.graph.opset, "risks": [vars(r) for r in risks]}
            write_atomic(self.out / "inspect.json", json.dumps(doc, indent=1, default=str).encode())
            summary = (f"{len(risks)} node(s) at static FP16 risk, e.g. {risks[0].node}: {risks[0].reason}" if risks
                       else f"no static FP16 risk among {len(self.graph.nodes)} nodes")
            return "ok", summary, (str(self.out / "inspect.json"),), risks

        self._do("inspect", self._cmd("inspect", self.model), f"{len(self.graph.nodes)} nodes, opset {self.graph.opset}", work)

    def compare(self):
        from aligner.compare import compare

        run_dir = self.out / "runs" / "compare"
        command = self._cmd("compare", self.model, "--target", shlex.quote(str(self.target)), "--inputs", self.inputs,
                            "--run", shlex.quote(str(run_dir)), "--force")

        def work():
            result = compare(self.graph, target=self.target, reference=self.reference, feeds=self.feeds)
            write_atomic(self.out / "compare.json", json.dumps(result.to_dict(), indent=1).encode())
            self._write_run("compare", result.to_dict())
            first = result.first_divergent
            summary = result.verdict()
            if first is None and self.task is not None:  # these inputs agree; the task metric on the whole dataset may not
                self.task_miss = self._task_miss()
                summary = f"{self.task_miss}, while on the inputs fed: {summary}" if self.task_miss else summary
            status = "diverged" if first is not None or self.task_miss else "ok"
            return status, summary, (str(run_dir),), result

        return self._do("compare", command, f"{self.target} vs {self.reference}, every tensor", work)

    def bisect(self):
        from aligner.search import bisect

        run_dir, repro = self.out / "runs" / "bisect", self.out / "culprit"
        strategy = ["--strategy", self.strategy] if self.strategy != "auto" else []
        command = self._cmd("bisect", self.model, "--target", shlex.quote(str(self.target)), "--inputs", self.inputs, *strategy,
                            "--save-repro", shlex.quote(str(repro)), "--run", shlex.quote(str(run_dir)), "--force")

        def work():
            note = ""
            try:
                verdict = bisect(self.graph, target=self.target, reference=self.reference, feeds=self.feeds, strategy=self.strategy,
                                 save_repro=repro, force=True)
            except InputError as exc:  # the repro's own run can refuse what the whole model takes (INT8 calibration on a subgraph)
                verdict = bisect(self.graph, target=self.target, reference=self.reference, feeds=self.feeds, strategy=self.strategy)
                note = f"; no repro saved ({exc})"
            self._write_run("bisect", verdict.to_dict())
            cause = verdict.root_cause
            summary = (f"root cause {cause.node} ({cause.op_type}, node #{cause.index}, kind {cause.kind}): {cause.reason}"
                       if cause is not None else verdict.explanation)
            if verdict.repro is not None:
                summary += f"; repro {verdict.repro.model}"
            summary += note
            return "diverged" if verdict.first_divergent is not None else "ok", summary, (str(run_dir), str(repro)), verdict

        return self._do("bisect", command, "first divergent node, its root cause and a standalone repro", work)

    def precision(self):
        from aligner.search.precision import search_precision

        self.plan_path = self.out / "plan.json"
        trials, mixed = self.out / "plan.trials.jsonl", self.out / f"model.{self.target.precision}.mixed.onnx"

        task = [*self.task.flags(), "--max-ap-drop", f"{self.task.max_drop:g}"] if self.task is not None else []
        command = self._cmd("precision", self.model, "--target", shlex.quote(str(self.target)), *self.all_inputs, *task,
                            "--out", shlex.quote(str(self.plan_path)), "--save-model", shlex.quote(str(mixed)),
                            "--run", shlex.quote(str(self.out / "runs" / "precision")), "--force")

        def work():
            trials.unlink(missing_ok=True)  # a fresh search (doctor's own folder)
            accept = {"accept": self.task.acceptance(self.graph)} if self.task is not None else {}  # the task metric decides
            plan = search_precision(self.graph, target=self.target, samples=self.samples, trials_log=trials, save_model=mixed,
                                    **accept)
            write_atomic(self.plan_path, json.dumps(plan.to_dict(), indent=1).encode())
            self._write_run("precision", plan.to_dict(), trials)
            kept = "in float" if self.target.is_quantized else "in FP32"
            if plan.passed and not plan.pins:
                summary = (f"the pure {self.target.precision.upper()} target already passes the acceptance "
                           f"({'; '.join(plan.accept)}): no node needs to be kept {kept}")
            elif plan.passed:
                summary = (f"{len(plan.pins)} node(s) kept {kept} ({', '.join(plan.fp32_nodes[:6])}"
                           f"{', ...' if len(plan.pins) > 6 else ''}), each verified necessary, {plan.trials} trials")
            if plan.passed:
                self.residual = self._residual(plan)
                summary += f"; {self.residual}" if self.residual else ""
            else:
                summary = f"no plan passed in {plan.trials} trials; see {trials}"
            return "passed" if plan.passed else "failed", summary, (str(self.plan_path), str(trials), str(mixed)), plan

        on = f" on {len(self.samples)} samples" if len(self.samples) > 1 else ""
        on += f", accepted on COCO AP within {self.task.max_drop:g} of FP32" if self.task is not None else ""
        return self._do("precision", command, f"the smallest verified set of nodes to keep in higher precision{on}", work)

    def _task_miss(self) -> str:
        """'' when the pure target keeps the task metric within ``max_drop`` of the reference, else how far it falls."""
        evaluation = self.task.evaluate(self.graph, [self.reference, str(self.target)])
        ref, got = (t.stats["AP"] for t in evaluation.targets)
        if got >= ref - self.task.max_drop:
            return ""
        return (f"{self.target} loses COCO AP: {got:.4f} vs {ref:.4f} for FP32 on {evaluation.targets[0].images} images "
                f"(allowed drop {self.task.max_drop:g})")

    def evaluate(self, plan) -> None:
        """The task metric of the reference, the pure target and (when one passed) the plan's target."""
        if self.task is None:
            self.skip("eval", "no task metric given (a COCO dataset and adapter, as aligner eval coco takes them)")
            return
        with_plan = plan is not None and plan.passed and bool(plan.pins)
        targets = [self.reference, str(self.target)] + ([_with_plan(self.target)] if with_plan else [])
        plan_args = ["--plan", shlex.quote(str(self.plan_path))] if with_plan else []
        command = self.task.command(self.model, "--targets", shlex.quote(",".join(targets)), *plan_args,
                                    "--json", shlex.quote(str(self.out / "eval.json")),
                                    "--run", shlex.quote(str(self.out / "runs" / "eval")), "--force")

        def work():
            result = self.task.evaluate(self.graph, targets, self.plan_path if with_plan else None)
            write_atomic(self.out / "eval.json", json.dumps(result.to_dict(), indent=1).encode())
            self._write_run("eval", result.to_dict())
            ref = result[self.reference].stats["AP"]
            rows = [f"{t.target} AP {t.stats['AP']:.4f}" + (f" ({t.stats['AP'] - ref:+.4f})" if t.target != self.reference else "")
                    for t in result.targets]
            return "ok", f"{'; '.join(rows)} on {result.targets[0].images} images", (str(self.out / "runs" / "eval"),), result

        self._do("eval", command, f"COCO AP of {', '.join(targets)} on {len(self.task.dataset)} images", work)

    def _residual(self, plan) -> str:
        """What still diverges inside with a passing plan (:func:`hidden_divergence`), with the command that lists it."""
        if not plan.inside:
            return ""
        return (f"{plan.inside} (aligner compare {self.model} --target {shlex.quote(_with_plan(self.target))} "
                f"--plan {shlex.quote(str(self.plan_path))} --inputs {self.inputs} lists them)")

    def build(self, plan):
        from aligner.build import build

        target = self.deployed()
        if target.precision in ("fp32",):
            self.skip("build", f"{self.target} is FP32: the model ships as it is")
            return None
        if backend_of(target).build is None:
            self.skip("build", f"{backend_of(target).title} compiles the ONNX model itself: it ships as it is (with the plan's pins)")
            return None
        spec = _with_plan(target) if plan is not None and plan.pins else str(target)
        output = self.out / f"model.{target.precision}.onnx"
        plan_args = ["--plan", shlex.quote(str(self.plan_path))] if "+plan" in spec else []
        command = self._cmd("build", self.model, "--target", shlex.quote(str(target)), *plan_args, "--inputs", self.inputs,
                            "-o", shlex.quote(str(output)), "--force")
        note = "" if target == self.target else f" (built for {target}, the runtime {self.target} stands for)"

        def work():
            built = build(self.graph, spec, output, plan=self.plan_path if "+plan" in spec else None, check_inputs=self.feeds,
                          force=True, write_anyway=True)
            check = built.check
            summary = f"wrote {built.output}{note}" + (f"; checked on {check.on} against FP32: "
                                                       f"{'passed' if check.passed else 'FAILED ' + ', '.join(check.diverging)} "
                                                       f"({check.rule()})" if check is not None else "")
            return "passed" if built.passed else "failed", summary, (built.output, built.sidecar or ""), built

        return self._do("build", command, f"the deployable model for {target}", work)

    def bench(self) -> None:
        from aligner.bench import bench

        target = self.deployed()
        base = f"{target.runtime}:{target.device}"
        specs = [f"{base}:fp32"] + ([str(target)] if target.precision != "fp32" else [])
        plan = self.plan_path if self.plan_path is not None and self.plan_path.is_file() and _plan_pins(self.plan_path) else None
        if plan is not None:
            specs.append(_with_plan(target))
        run_dir = self.out / "runs" / "bench"
        command = self._cmd("bench", self.model, "--target", shlex.quote(",".join(specs)),
                            *(["--plan", shlex.quote(str(plan))] if plan else []), "--inputs", self.inputs,
                            "--runs", str(self.bench_runs), "--json", shlex.quote(str(self.out / "bench.json")),
                            "--run", shlex.quote(str(run_dir)), "--force")

        def work():
            runnable, crashed = self._runnable(specs, plan)  # timing runs in this process: a runtime crash would end doctor
            if not runnable:
                return "failed", "; ".join(crashed), (), None
            result = bench(self.graph, runnable, [_batch(self.feeds)], plan, runs=self.bench_runs, warmup=3, inputs=self.feeds)
            write_atomic(self.out / "bench.json", json.dumps(result.to_dict(), indent=1).encode())
            self._write_run("bench", result.to_dict())
            summary = "; ".join([f"{r.target} {r.latency_ms['median']:.3f} ms" for r in result.rows] + crashed) + f" on {result.device}"
            return "ok" if not crashed else "failed", summary, (str(run_dir),), result

        self._do("bench", command, f"median latency of {', '.join(specs)}", work, fatal=False)

    bench_runs = 20

    def _runnable(self, specs: list[str], plan: Path | None) -> tuple[list[str], list[str]]:
        """The specs whose runner runs the inputs once (sandboxed where the runtime is), and a line for each that does not."""
        from aligner.backends import make_runner

        ok, failed = [], []
        for spec in specs:
            try:
                make_runner(self.graph, Target.parse(spec, plan=plan)).run(self.feeds)
                ok.append(spec)
            except (TargetError, TargetRunError, MissingDependencyError) as exc:
                failed.append(f"{spec} not timed: {str(exc).split('. ')[0]}")
        return ok, failed

    def report(self) -> str | None:
        from aligner.report import write_report

        path = self.out / "report.html"
        dirs = " ".join(shlex.quote(str(r)) for r in self.runs)
        command = self._cmd("report", dirs, "-o", shlex.quote(str(path)), "--force")

        def work():
            write_report(self.runs, path, force=True, title=f"aligner doctor: {self.graph.path.name if self.graph.path else 'model'}, "
                                                            f"{self.target}")
            return "ok", f"{path} ({len(self.runs)} runs: {', '.join(r.name for r in self.runs)})", (str(path),), str(path)

        return self._do("report", command, "one self-contained HTML page", work)

    def deployed(self) -> Target:
        """The runtime target a build and a timing use: the target itself, or for the emulator the ONNX
        Runtime CPU target of its precision (the emulator models a GPU build; its speed means nothing)."""
        return backend_of(self.target).deploys_as(self.target) or self.target


def _with_plan(target: Target) -> str:
    """``target`` with ``+plan`` (the plan file given apart), before its @options."""
    head, at, options = str(target).partition("@")
    return f"{head}+plan{at}{options}"


def _plan_pins(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("fp32_nodes"))
    except (OSError, ValueError, AttributeError):
        return False


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


__all__ = ["doctor"]
