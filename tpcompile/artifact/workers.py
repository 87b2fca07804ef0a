"""Worker processes of a compile: capturing rank programs (forked) and converting ranks to ONNX (spawned).

Jobs are numbered. Their numbers wait in a pipe, one 4-byte record each, all written (and the writing end
closed) before any worker starts; every worker, and the compiler itself once it has nothing else to do,
takes the next number by reading one record, until the pipe is empty. Each worker sends each result back
on a pipe of its own.

Invariants: a worker dies with the compiler (also when the compiler is SIGKILLed: see
:func:`~tpcompile.runtime.launch.lifetime.die_with_parent`), leaves Ctrl-C to the compiler and dies at once
on SIGTERM; leaving :func:`worker_pool` terminates and reaps every worker, so no worker outlives the
compile or writes anything after it. Only pipes are used (no named semaphore), so a killed compile leaves
nothing in /dev/shm. Every job runs exactly once, or :meth:`WorkerPool.results` raises.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from tqdm import tqdm

from tpcompile.errors import TpCompileError, UnsupportedModelError
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.launch.lifetime import die_with_parent, stop_signals_held, worker_signals

__all__ = ["MAX_JOBS", "WorkerFailed", "WorkerPool", "job_failure", "worker_pool"]

J = TypeVar("J")
R = TypeVar("R")

_RECORD = struct.Struct("<I")
#: Job numbers fit the pipe (64 KiB on Linux) at once, so writing them never waits for a reader.
MAX_JOBS = 65536 // _RECORD.size
_GRACE_S = 5.0


class WorkerFailed(RuntimeError):
    """A worker process died, or its job raised: the message says which and how."""


def job_failure(err: Exception, what: str) -> Exception:
    """How a job's failure crosses from a worker to the compiler, as a result: a typed compiler error or
    an ``OSError`` (a full disk) as it is, anything else as one line (``WHAT failed: Type: first line``),
    reported as an unsupported model."""
    if isinstance(err, TpCompileError | OSError):
        return err
    return UnsupportedModelError(f"{what} failed: {type(err).__name__}: {first_line(err)}")


def _serve(
    fn: Callable[[Any], Any], jobs: Sequence[Any], tickets: Connection, results: Connection, parent: int
) -> None:
    """A worker's life: take job numbers until none is left, send back ``(number, fn(job))`` for each."""
    die_with_parent(parent)
    worker_signals()
    # tqdm (torch.fx's interpreter makes a disabled bar) would create a multiprocessing lock: a named
    # semaphore that a worker's exit leaves behind ("leaked semaphore objects" on the terminal)
    tqdm.set_lock(threading.RLock())
    while record := os.read(tickets.fileno(), _RECORD.size):
        (index,) = _RECORD.unpack(record)
        try:
            value = fn(jobs[index])
        except Exception as exc:  # the job's own errors are its results; anything else is reported here
            value = WorkerFailed(f"{type(exc).__name__}: {first_line(exc)}")
        results.send((index, value))
    gc.freeze()  # the worker exits next: its collections at exit would only scan what its jobs left


class WorkerPool(Generic[J, R]):
    """Started workers and the jobs' pipe; see :func:`worker_pool`."""

    def __init__(self, fn: Callable[[J], R], jobs: Sequence[J], workers: int, method: str) -> None:
        if len(jobs) > MAX_JOBS:
            raise ValueError(f"{len(jobs)} jobs are more than a worker pool takes ({MAX_JOBS})")
        self.fn, self.jobs = fn, jobs
        self.collected = 0
        read_fd, write_fd = os.pipe()
        os.write(write_fd, b"".join(_RECORD.pack(i) for i in range(len(jobs))))
        os.close(write_fd)  # an empty pipe now reads as end-of-file: no job is left
        self.tickets = Connection(read_fd, writable=False)
        self.processes: list[BaseProcess] = []
        self.pipes: dict[Connection, BaseProcess] = {}
        context = multiprocessing.get_context(method)
        for _ in range(min(workers, len(jobs))):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(  # type: ignore[attr-defined]
                target=_serve, args=(fn, jobs, self.tickets, send, os.getpid()), daemon=True
            )
            with stop_signals_held():
                process.start()
            send.close()  # the worker holds the only writing end: its exit is an end-of-file here
            self.processes.append(process)
            self.pipes[receive] = process

    def take(self) -> int | None:
        """The number of a job no one has taken yet (the caller runs it), or None."""
        record = os.read(self.tickets.fileno(), _RECORD.size)
        return _RECORD.unpack(record)[0] if record else None

    def results(self, share: bool = True) -> Iterator[tuple[int, R]]:
        """``(job number, result)`` as jobs finish, until every job has; with ``share`` (or without workers)
        the caller runs jobs too, between collecting the workers' results.

        Raises:
            WorkerFailed: a worker died before its jobs were done, or a job raised in a worker.
        """
        while self.collected < len(self.jobs):
            index = self.take() if share or not self.pipes else None
            if index is not None:
                self.collected += 1
                yield index, self.fn(self.jobs[index])
            elif not self.pipes:  # every job is taken, and no worker is left to finish one
                raise WorkerFailed(f"{len(self.jobs) - self.collected} jobs were lost by worker processes")
            timeout = 0.0 if index is not None else None
            for conn in wait(list(self.pipes), timeout):
                yield from self._receive(conn)  # type: ignore[arg-type]

    def _receive(self, conn: Connection) -> Iterator[tuple[int, R]]:
        try:
            index, value = conn.recv()
        except EOFError:  # the worker exited: normally, once no job was left
            process = self.pipes.pop(conn)
            conn.close()
            process.join()
            if process.exitcode != 0:
                raise WorkerFailed(f"a worker process {_ended(process.exitcode)}") from None
            return
        if isinstance(value, WorkerFailed):
            raise value
        self.collected += 1
        yield index, value

    def close(self) -> None:
        """Terminate the workers still running (SIGTERM, SIGKILL after a grace period) and reap them all."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(_GRACE_S)
            if process.exitcode is None:
                process.kill()
                process.join()
        for conn in self.pipes:
            conn.close()
        self.tickets.close()


def _ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


@contextmanager
def worker_pool(
    fn: Callable[[J], R], jobs: Sequence[J], workers: int, method: str = "fork"
) -> Iterator[WorkerPool[J, R]]:
    """Start ``workers`` processes (``fork`` or ``spawn``) running ``fn`` over ``jobs``; leaving the context
    stops and reaps them all. With ``spawn``, ``fn`` and the jobs must pickle; ``fn`` should return its
    failures as values (a raised exception ends the run as :class:`WorkerFailed`)."""
    pool = WorkerPool(fn, jobs, workers, method)
    try:
        yield pool
    finally:
        pool.close()
