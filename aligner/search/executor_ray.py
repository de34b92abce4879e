"""Trials as Ray actors on a local or remote cluster (:mod:`aligner.search.executor`'s interface;
``pip install aligner[ray]``). Each actor unpickles the job once; an actor whose process dies is
that task's TargetRunError and a new actor takes its place."""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

from aligner.errors import TargetRunError
from aligner.search.executor import Outcome, WorkerStats, _Queued, _portable, _run, pack_job


class RayExecutor(_Queued):
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
        from aligner.backends.ort.runner import THREADS_ENV

        threads = {THREADS_ENV: os.environ.get(THREADS_ENV, "1")}  # one CPU per actor: one thread inside an op
        self._actor_class = ray.remote(num_cpus=1, num_gpus=self.gpus, max_restarts=0,
                                       runtime_env={"env_vars": threads})(_RayWorker)
        self._stats = [WorkerStats(f"r{i + 1}") for i in range(self.workers)]
        self._actors = [self._actor_class.remote(self._blob) for _ in range(self.workers)]

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


__all__ = ["RayExecutor"]
