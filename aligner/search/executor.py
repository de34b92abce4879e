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
* :class:`ProcessExecutor` keeps N worker processes (fresh interpreters, as the sandbox starts
  them: nothing of the caller's state is forked).
* :class:`RayExecutor` keeps N Ray actors on a local or remote cluster (``pip install aligner[ray]``).

Parallelism changes when a task runs, never which result a search uses.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aligner.errors import InputError, TargetRunError

log = logging.getLogger(__name__)

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


# ---- local worker processes ----------------------------------------------------------------------

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


def _write(stream, message) -> None:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(blob)) + blob)
    stream.flush()


def _read(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    size = struct.unpack("<Q", head)[0]
    blob = stream.read(size)
    if len(blob) < size:
        raise EOFError
    return pickle.loads(blob)  # noqa: S301 - our own worker's messages, over our own pipes


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles (and unpickles), else a TargetRunError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return TargetRunError(f"{type(exc).__name__}: {exc}")


def _serve(read_fd: int, write_fd: int) -> None:  # pragma: no cover - runs in the worker
    import aligner.backends.onnxruntime  # noqa: F401 - onnx, ONNX Runtime, numpy: imported while the caller prepares the job

    requests, replies = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    try:
        _, path, blob = _read(requests)
    except EOFError:
        return
    sys.path[:0] = [p for p in path if p not in sys.path]  # the caller's modules (a test's acceptance function)
    try:
        job = pickle.loads(blob)  # noqa: S301 - the job the caller packed
    except Exception as exc:  # noqa: BLE001
        _write(replies, ("failed", _portable(exc)))
        return
    _write(replies, ("ready", None))
    while True:
        try:
            ticket, task = _read(requests)
        except EOFError:
            return
        value, error, seconds = _run(job, task)
        try:
            _write(replies, (ticket, value, _portable(error) if error else None, seconds))
        except (TypeError, pickle.PicklingError, AttributeError) as exc:
            _write(replies, (ticket, None, TargetRunError(f"the worker's result cannot be sent back: {exc}"), seconds))


def worker_env(workers: int) -> dict[str, str]:
    """A worker's environment: ONNX Runtime's threads inside one op default to its share of the cores
    (``ALIGNER_ORT_THREADS``, unless set already: 0 is ONNX Runtime's own default), so N workers do not
    each start a thread pool the size of the machine (on 2 busy cores, 2 threads per worker ran the
    detector 1.5-1.9x slower than 1; the values were bitwise equal)."""
    from aligner.backends.onnxruntime import THREADS_ENV

    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault(THREADS_ENV, str(max(1, cores // workers)))
    return env


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, index: int, env: dict[str, str]):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", f"from aligner.search.executor import _serve; _serve({to_child_r}, {from_child_w})"],
                                     pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.index, self.requests, self.replies = index, os.fdopen(to_child_w, "wb"), os.fdopen(from_child_r, "rb")
        self.ready = False  # it has loaded the job
        self.task: tuple[int, float] | None = None  # (ticket, sent at)

    def load(self, blob: bytes) -> None:
        _write(self.requests, ("init", list(sys.path), blob))

    def close(self, kill: bool = False) -> int | None:
        for stream in (self.requests, self.replies):
            try:
                stream.close()
            except OSError:
                pass
        if kill and self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class ProcessExecutor(_Base):
    """N local worker processes, each unpickling the job once; a dead worker is replaced."""

    kind = "processes"

    def __init__(self, workers: int):
        if workers < 1:
            raise InputError(f"--workers {workers}: give at least 1.")
        super().__init__(workers)
        self._blob = b""
        self._pool: list[_Worker | None] = []
        self._queue: deque[tuple[int, Any]] = deque()
        self._sel = selectors.DefaultSelector()

    def warm(self) -> None:
        """Start the worker processes now: they import ONNX Runtime while the caller prepares the job."""
        if not self._pool:
            self._stats = [WorkerStats(f"w{i + 1}") for i in range(self.workers)]
            self._pool = [self._spawn(i) for i in range(self.workers)]

    def start(self, job) -> None:
        self._blob, self._started = pack_job(job), time.perf_counter()
        self.warm()
        for worker in self._pool:
            if worker is not None:
                self._load(worker)

    def _spawn(self, index: int) -> _Worker:
        worker = _Worker(index, worker_env(self.workers))
        self._sel.register(worker.replies, selectors.EVENT_READ, worker)
        return worker

    def _load(self, worker: _Worker) -> None:
        try:
            worker.load(self._blob)
        except (BrokenPipeError, OSError):
            self._lost(worker)

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

    def result(self, ticket: int) -> Outcome:
        while ticket not in self._done:
            if not any(w is not None and w.task and w.task[0] == ticket for w in self._pool) and all(t != ticket for t, _ in self._queue):
                raise KeyError(f"no task {ticket}")
            self._wait()
        return self._take(ticket)

    def _dispatch(self) -> None:
        for i, worker in enumerate(self._pool):
            if not self._queue:
                return
            if worker is None:
                worker = self._pool[i] = self._spawn(i)
                self._load(worker)
                continue  # it takes a task once it has loaded the job
            if worker.ready and worker.task is None:
                ticket, task = self._queue.popleft()
                try:
                    _write(worker.requests, (ticket, task))
                    worker.task = (ticket, time.perf_counter())
                except (BrokenPipeError, OSError):
                    self._queue.appendleft((ticket, task))
                    self._lost(worker)

    def _wait(self) -> None:
        for key, _ in self._sel.select():
            worker: _Worker = key.data
            try:
                message = _read(worker.replies)
            except (EOFError, OSError, pickle.UnpicklingError):
                self._lost(worker)
                continue
            if not worker.ready:
                kind, error = message
                if kind == "failed":
                    self.close()
                    raise InputError(f"A worker process could not load the search: {type(error).__name__}: {error}. Use --workers 1, "
                                     "or make what the search holds importable in a fresh Python process.")
                worker.ready = True
            else:
                ticket, value, error, seconds = message
                worker.task = None
                stats = self._stats[worker.index]
                stats.tasks += 1
                stats.seconds += seconds
                self._finished(ticket, Outcome(value, error, stats.name, seconds))
        self._dispatch()

    def _lost(self, worker: _Worker) -> None:
        """The worker died: its task is a TargetRunError (the runtime crashed in it); a fresh one takes its place."""
        self._sel.unregister(worker.replies)
        code = worker.close(kill=True)
        self._pool[worker.index] = None
        stats = self._stats[worker.index]
        if worker.task is None:
            if not worker.ready:
                self.close()
                raise TargetRunError(f"Worker process {stats.name} died ({_describe(code)}) while loading the search; "
                                     "see its message above, or use --workers 1.")
            return
        ticket, sent = worker.task
        stats.crashed += 1
        log.warning("worker %s died (%s) while running a trial; a new worker takes its place", stats.name, _describe(code))
        self._finished(ticket, Outcome(None, TargetRunError(
            f"worker {stats.name}: the process died ({_describe(code)}) while building or running this trial: the runtime crashed "
            "(in-process: custom ops are not sandboxed). Nothing was judged on this trial; the search goes on."),
            stats.name, time.perf_counter() - sent))
        self._dispatch()

    def close(self) -> None:
        if self._closed is not None:
            return
        self._closed = time.perf_counter()
        for worker in self._pool:
            if worker is not None:
                self._sel.unregister(worker.replies)
                worker.close(kill=worker.task is not None)
        self._pool = []
        self._sel.close()


# ---- Ray -----------------------------------------------------------------------------------------

class RayExecutor(_Base):
    """N Ray actors (default: one per CPU of the cluster), each holding the job; ``address`` None
    starts or joins a local cluster, ``ray://HOST:PORT`` joins a remote one."""

    kind = "ray"

    def __init__(self, address: str | None = None, workers: int = 0, gpus: float = 0.0):
        super().__init__(workers)
        self.address, self.gpus = address, gpus
        self._ray = None
        self._own = False
        self._actors: list = []
        self._running: dict[Any, tuple[int, int]] = {}  # object ref -> (ticket, actor index)
        self._queue: deque[tuple[int, Any]] = deque()

    def start(self, job) -> None:
        from aligner._optional import require

        ray = self._ray = require("ray", "--workers ray (trials as Ray tasks)")
        if not ray.is_initialized():
            if self.address:  # ray://HOST:PORT: Ray Client (the ray extra brings ray[client])
                ray.init(address=self.address)
            else:  # a new local cluster, or the one RAY_ADDRESS (or a running local one) names
                try:
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
                except ValueError:  # an existing cluster refuses settings of a new one
                    ray.init(log_to_driver=False, configure_logging=False)
            self._own = True
        if not self.workers:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._started = time.perf_counter()
        self._blob = ray.put(pack_job(job))
        from aligner.backends.onnxruntime import THREADS_ENV

        threads = {THREADS_ENV: os.environ.get(THREADS_ENV, "1")}  # one CPU per actor: one thread inside an op
        self._actor_class = ray.remote(num_cpus=1, num_gpus=self.gpus, max_restarts=0,
                                       runtime_env={"env_vars": threads})(_RayWorker)
        self._stats = [WorkerStats(f"r{i + 1}") for i in range(self.workers)]
        self._actors = [self._actor_class.remote(self._blob) for _ in range(self.workers)]

    def submit(self, task) -> int:
        ticket = self._ticket()
        self._queue.append((ticket, task))
        self._dispatch()
        return ticket

    def discard(self, ticket: int) -> None:
        queued = [t for t in self._queue if t[0] != ticket]
        if len(queued) < len(self._queue):
            self._queue = deque(queued)
        elif ticket in self._done:
            self._done.pop(ticket)
            self._wasted += 1
        else:
            self._dropped.add(ticket)

    def _dispatch(self) -> None:
        busy = {index for _, index in self._running.values()}
        for index in range(self.workers):
            if not self._queue:
                return
            if index not in busy:
                ticket, task = self._queue.popleft()
                self._running[self._actors[index].run.remote(task)] = (ticket, index)

    def result(self, ticket: int) -> Outcome:
        ray = self._ray
        while ticket not in self._done:
            if ticket not in {t for t, _ in self._running.values()} and all(t != ticket for t, _ in self._queue):
                raise KeyError(f"no task {ticket}")
            ready, _ = ray.wait(list(self._running), num_returns=1)
            for ref in ready:
                done, index = self._running.pop(ref)
                stats = self._stats[index]
                try:
                    value, error, seconds = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the actor's process died: its runtime crashed
                    stats.crashed += 1
                    self._actors[index] = self._actor_class.remote(self._blob)
                    value, seconds = None, 0.0
                    error = TargetRunError(f"Ray worker {stats.name}: its process died while building or running this trial "
                                           f"({str(exc).splitlines()[0][:200]}). Nothing was judged on this trial; the search goes on.")
                stats.tasks += 1
                stats.seconds += seconds
                self._finished(done, Outcome(value, error, stats.name, seconds))
            self._dispatch()
        return self._take(ticket)

    def close(self) -> None:
        if self._closed is not None or self._ray is None:
            return
        self._closed = time.perf_counter()
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._own:
            self._ray.shutdown()


class _RayWorker:  # becomes a Ray actor class in RayExecutor.start
    def __init__(self, blob: bytes):
        self.job = pickle.loads(blob)  # noqa: S301 - the job the driver packed

    def run(self, task):
        value, error, seconds = _run(self.job, task)
        return value, (_portable(error) if error else None), seconds


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


def make_executor(workers: Workers = 1, gpus: float = 0.0) -> Executor:
    """The executor ``--workers`` names (see :func:`parse_workers`); ``gpus`` per Ray worker for
    targets that need a GPU."""
    workers = parse_workers(workers)
    if workers == 1:
        return SerialExecutor()
    if isinstance(workers, int):
        return ProcessExecutor(workers)
    from aligner._optional import check

    check("ray", "--workers ray (trials as Ray tasks)")
    return RayExecutor(None if workers == "ray" else workers, gpus=gpus)


__all__ = ["Executor", "ExecutorStats", "Outcome", "ProcessExecutor", "RayExecutor", "SerialExecutor", "WorkerStats", "Workers",
           "make_executor", "pack_job", "parse_workers"]
