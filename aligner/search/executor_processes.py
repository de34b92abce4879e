"""Trials in local worker processes (:mod:`aligner.search.executor`'s interface).

Each worker is a fresh interpreter (started as the sandbox starts its child: nothing of the caller's
state is forked, and the caller's script is not re-imported as multiprocessing's spawn would). It
imports ONNX Runtime as soon as it starts, unpickles the job once, then runs tasks sent over a pipe
and sends each result back. A worker that dies mid-task is that task's TargetRunError and a fresh
worker takes its place.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
from typing import Any

from aligner.backends.ort.sandbox import describe_exit
from aligner.errors import InputError, TargetRunError
from aligner.search.executor import Outcome, WorkerStats, _Queued, _portable, _run, pack_job

log = logging.getLogger(__name__)


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


def _serve(read_fd: int, write_fd: int) -> None:  # pragma: no cover - runs in the worker
    import aligner.backends.ort.runner  # noqa: F401 - onnx, ONNX Runtime, numpy: imported while the caller prepares the job

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
    from aligner.backends.ort.runner import THREADS_ENV

    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault(THREADS_ENV, str(max(1, cores // workers)))
    return env


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, index: int, env: dict[str, str]):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", f"from aligner.search.executor_processes import _serve; _serve({to_child_r}, {from_child_w})"],
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


class ProcessExecutor(_Queued):
    """N local worker processes, each unpickling the job once; a dead worker is replaced."""

    kind = "processes"

    def __init__(self, workers: int):
        if workers < 1:
            raise InputError(f"--workers {workers}: give at least 1.")
        super().__init__(workers)
        self._blob = b""
        self._pool: list[_Worker | None] = []
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
                raise TargetRunError(f"Worker process {stats.name} died ({describe_exit(code)}) while loading the search; "
                                     "see its message above, or use --workers 1.")
            return
        ticket, sent = worker.task
        stats.crashed += 1
        log.warning("worker %s died (%s) while running a trial; a new worker takes its place", stats.name, describe_exit(code))
        self._finished(ticket, Outcome(None, TargetRunError(
            f"worker {stats.name}: the process died ({describe_exit(code)}) while building or running this trial: the runtime crashed "
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


__all__ = ["ProcessExecutor", "worker_env"]
