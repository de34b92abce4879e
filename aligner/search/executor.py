"""Where independent trials run: in this process, in local worker processes, or as Ray tasks.

A search hands an executor a *job* once (:meth:`Executor.start`): a picklable callable, e.g. the
precision search's trial job holding the model, target, samples, reference outputs and acceptance.
Then it submits *tasks* (the job's argument: a pin set, a shard of images) and asks for each
result by its ticket, in the order the search consumes them (its canonical order), whatever order
they finished in. Every worker unpickles the job once and keeps it — and the runtime sessions it
caches — for all its tasks.

A worker that dies mid-task (its runtime crashed in-process: a custom op, a segfault outside the
sandbox) is reported for that task as a :class:`~aligner.errors.TargetRunError`, as the sandbox
reports a crashed runtime, and a fresh worker takes its place: the search goes on.

* :class:`SerialExecutor` runs a task when its result is asked for; a task discarded unasked never
  runs (so speculation costs nothing serially).
* :class:`~aligner.search.executor_processes.ProcessExecutor` keeps N worker processes (fresh
  interpreters, as the sandbox starts them: nothing of the caller's state is forked).
* :class:`~aligner.search.executor_ray.RayExecutor` keeps N Ray actors on a local or remote cluster
  (``pip install aligner[ray]``).

Parallelism changes when a task runs, never which result a search uses.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aligner.errors import InputError, TargetRunError

Workers = int | str  # 1 (serial), N (local processes), "ray", "ray://HOST:PORT"


@dataclass
class WorkerStats:
    """One worker's share: tasks finished, seconds busy, tasks whose worker died."""

    name: str
    tasks: int = 0
    seconds: float = 0.0
    crashed: int = 0


@dataclass
class ExecutorStats:
    """What an executor did: per worker, and tasks run for results nobody used (speculation)."""

    kind: str
    workers: list[WorkerStats] = field(default_factory=list)
    wall: float = 0.0  # seconds from start to close (or to now)
    used_seconds: float = 0.0  # worker seconds of the tasks whose result was asked for
    wasted: int = 0  # tasks that ran but were discarded (speculated and not needed)

    @property
    def tasks(self) -> int:
        return sum(w.tasks for w in self.workers)

    def speedup(self) -> float:
        """Worker seconds of the results used over wall seconds: about how much faster than running
        the same tasks one after another (an estimate: a loaded machine slows each task too)."""
        return self.used_seconds / self.wall if self.wall > 0 else 1.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "wall_s": round(self.wall, 3), "used_task_s": round(self.used_seconds, 3), "wasted_tasks": self.wasted,
                "speedup_estimate": round(self.speedup(), 2),
                "workers": [{"name": w.name, "tasks": w.tasks, "seconds": round(w.seconds, 3), "crashed": w.crashed} for w in self.workers]}


@dataclass(frozen=True)
class Outcome:
    """A finished task: its value, or the exception it raised (re-raised by :meth:`Executor.result`)."""

    value: Any = None
    error: BaseException | None = None
    worker: str = ""
    seconds: float = 0.0


class Executor(Protocol):
    workers: int  # how many tasks run at once

    def warm(self) -> None: ...  # start the workers now (they import while the caller prepares the job)

    def start(self, job: Callable[[Any], Any]) -> None: ...

    def submit(self, task: Any) -> int: ...

    def result(self, ticket: int) -> Outcome: ...

    def discard(self, ticket: int) -> None: ...

    def close(self) -> None: ...

    def stats(self) -> ExecutorStats: ...


class _Base:
    """Tickets, stats and the context-manager protocol shared by the executors."""

    kind = ""

    def __init__(self, workers: int):
        self.workers = workers
        self._next = 0
        self._done: dict[int, Outcome] = {}
        self._dropped: set[int] = set()
        self._started: float | None = None
        self._closed: float | None = None
        self._stats: list[WorkerStats] = []
        self._used = 0.0
        self._wasted = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warm(self) -> None:
        """Nothing to start ahead of the job."""

    def _ticket(self) -> int:
        self._next += 1
        return self._next

    def _finished(self, ticket: int, outcome: Outcome) -> None:
        if ticket in self._dropped:
            self._dropped.discard(ticket)
            self._wasted += 1
        else:
            self._done[ticket] = outcome

    def _take(self, ticket: int) -> Outcome:
        outcome = self._done.pop(ticket)
        self._used += outcome.seconds
        return outcome

    def stats(self) -> ExecutorStats:
        end = self._closed or time.perf_counter()
        wall = end - self._started if self._started is not None else 0.0
        return ExecutorStats(self.kind, [WorkerStats(w.name, w.tasks, w.seconds, w.crashed) for w in self._stats], wall, self._used,
                             self._wasted)


class _Queued(_Base):
    """A queue of tasks waiting for a worker (the process pool's and Ray's): ``_dispatch`` starts them."""

    def __init__(self, workers: int):
        super().__init__(workers)
        self._queue: deque[tuple[int, Any]] = deque()

    def submit(self, task) -> int:
        ticket = self._ticket()
        self._queue.append((ticket, task))
        self._dispatch()
        return ticket

    def discard(self, ticket: int) -> None:
        queued = [t for t in self._queue if t[0] != ticket]
        if len(queued) < len(self._queue):
            self._queue = deque(queued)  # not started: never runs
        elif ticket in self._done:
            self._done.pop(ticket)
            self._wasted += 1
        else:
            self._dropped.add(ticket)  # running: its result is thrown away when it comes

    def _dispatch(self) -> None:
        raise NotImplementedError


def _run(job, task) -> tuple[Any, BaseException | None, float]:
    start = time.perf_counter()
    try:
        return job(task), None, time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - handed to whoever asks for the result, as if run there
        return None, exc, time.perf_counter() - start


class SerialExecutor(_Base):
    """Runs each task in this process when its result is asked for."""

    kind = "serial"

    def __init__(self):
        super().__init__(1)
        self._job = None
        self._queued: dict[int, Any] = {}

    def start(self, job) -> None:
        self._job, self._started = job, time.perf_counter()
        self._stats = [WorkerStats("main")]

    def submit(self, task) -> int:
        ticket = self._ticket()
        self._queued[ticket] = task
        return ticket

    def result(self, ticket: int) -> Outcome:
        value, error, seconds = _run(self._job, self._queued.pop(ticket))
        self._stats[0].tasks += 1
        self._stats[0].seconds += seconds
        self._done[ticket] = Outcome(value, error, "main", seconds)
        return self._take(ticket)

    def discard(self, ticket: int) -> None:
        self._queued.pop(ticket, None)  # never run

    def close(self) -> None:
        self._closed = self._closed or time.perf_counter()


# ---- what crosses to a worker -------------------------------------------------------------------

def _dumps(obj) -> bytes:
    """cloudpickle where installed (closures, lambdas: e.g. a task-metric acceptance), else pickle."""
    try:
        import cloudpickle
    except ImportError:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def pack_job(job) -> bytes:
    """The job as bytes each worker unpickles once; a job that cannot cross to a worker is refused
    with what to do."""
    try:
        return _dumps(job)
    except Exception as exc:  # noqa: BLE001 - pickling raises many types
        raise InputError(f"The search cannot be sent to worker processes: {type(exc).__name__}: {exc}. Something it holds (an "
                         "acceptance callable, a task metric) cannot be pickled; define it at module level, or use --workers 1.") from None


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles (and unpickles), else a TargetRunError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return TargetRunError(f"{type(exc).__name__}: {exc}")


# ---- choosing one --------------------------------------------------------------------------------

def parse_workers(spec: Workers) -> Workers:
    """``--workers``: a count (1 = serial), ``ray`` (a local Ray cluster, or the one ``RAY_ADDRESS``
    names) or ``ray://HOST:PORT``; anything else is refused with the forms."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise InputError(f"--workers {spec}: give at least 1 (1 runs trials one after another in this process).")
        return spec
    text = str(spec).strip()
    if text.isdigit():
        return parse_workers(int(text))
    if text == "ray" or text.startswith("ray://"):
        return text
    raise InputError(f"--workers {spec!r}: give a number of local worker processes (e.g. 4), 'ray' (a local Ray cluster, or "
                     "the one RAY_ADDRESS names) or 'ray://HOST:PORT' (a remote Ray cluster).")


__all__ = ["Executor", "ExecutorStats", "Outcome", "SerialExecutor", "WorkerStats", "Workers", "pack_job",
           "parse_workers"]
