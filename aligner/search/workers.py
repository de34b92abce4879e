"""Choosing the trial executor ``--workers`` names: serial, local processes or Ray.

Apart from :mod:`aligner.search.executor` (the interface, the serial executor and the parts the
process and Ray executors share), so that those two import the interface and nothing imports back.
"""

from __future__ import annotations

from aligner.search.executor import Executor, SerialExecutor, Workers, parse_workers


def make_executor(workers: Workers = 1, gpus: float = 0.0) -> Executor:
    """The executor ``--workers`` names (see :func:`parse_workers`); ``gpus`` per Ray worker for
    targets that need a GPU."""
    workers = parse_workers(workers)
    if workers == 1:
        return SerialExecutor()
    if isinstance(workers, int):
        from aligner.search.executor_processes import ProcessExecutor

        return ProcessExecutor(workers)
    from aligner._optional import check

    check("ray", "--workers ray (trials as Ray tasks)")
    from aligner.search.executor_ray import RayExecutor

    return RayExecutor(None if workers == "ray" else workers, gpus=gpus)


__all__ = ["make_executor"]
