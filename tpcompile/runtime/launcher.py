"""Spawning one worker process per rank on this machine and supervising them.

When the environment already defines ``RANK`` and ``WORLD_SIZE`` (running
under ``torchrun``), :func:`launch` spawns nothing and returns
:data:`RUN_IN_PROCESS` so the caller runs the worker in the current process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from .distributed import in_torchrun
from .reporting import (
    ERROR_PREFIX,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    LAUNCHER_PID_ENV,
    VERBATIM_MARK,
    print_error,
)

__all__ = [
    "LAUNCHER_PID_ENV",
    "RUN_IN_PROCESS",
    "WORKER_MODULE",
    "LaunchOutcome",
    "bind_lifetime_to_launcher",
    "free_port",
    "launch",
    "spawn_workers",
    "worker_env",
]

#: Returned by :func:`launch` when the caller must run the worker in-process.
RUN_IN_PROCESS: Final = -1
WORKER_MODULE: Final = "tpcompile.runtime.worker"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.1
_STDERR_LOCK = threading.Lock()


@dataclass(frozen=True)
class LaunchOutcome:
    """Result of :func:`spawn_workers`: exit code and, on failure, a one-line reason.

    ``reported`` is True when the failed rank already printed its error to
    the user verbatim (an error every rank hit the same way), so the
    launcher adds nothing.
    """

    returncode: int
    message: str | None = None
    failed_rank: int | None = None
    reported: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _package_root() -> Path | None:
    """Directory to put on PYTHONPATH so children can import an uninstalled tpcompile."""
    root = Path(__file__).resolve().parents[2]
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return None
    return root


def worker_env(rank: int, nprocs: int, port: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for local rank ``rank`` of ``nprocs`` (env:// rendezvous on 127.0.0.1)."""
    env = dict(os.environ if base is None else base)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    root = _package_root()
    if root is not None:
        paths = [str(root), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def bind_lifetime_to_launcher(environ: Mapping[str, str] | None = None) -> None:
    """In a spawned worker: get SIGKILLed when the launcher dies, so no rank is orphaned.

    Uses Linux ``PR_SET_PDEATHSIG``; done in the worker itself rather than in a
    ``preexec_fn`` (which is unsafe when the launching process has threads).
    A no-op for workers not started by :func:`spawn_workers` or off Linux.
    """
    env = os.environ if environ is None else environ
    launcher_pid = env.get(LAUNCHER_PID_ENV)
    if launcher_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != launcher_pid:  # the launcher died before prctl took effect
        os._exit(EXIT_FAILURE)


class _Rank:
    """A spawned rank: its process, a thread forwarding stderr, and its last words."""

    def __init__(self, rank: int, proc: subprocess.Popen[str], prefix: str) -> None:
        self.rank = rank
        self.proc = proc
        self.prefix = prefix
        self.last_line = ""
        self.error_line = ""
        self.reported = False
        self.reader = threading.Thread(target=self._pump, name=f"rank{rank}-stderr", daemon=True)

    def _pump(self) -> None:
        stream: IO[str] | None = self.proc.stderr
        if stream is None:
            return
        for line in stream:
            verbatim = line.startswith(VERBATIM_MARK)
            if verbatim:
                line = line.removeprefix(VERBATIM_MARK)
            with _STDERR_LOCK:
                sys.stderr.write(line if verbatim else self.prefix + line)
                sys.stderr.flush()
            text = line.strip()
            if text:
                self.last_line = text
                if text.startswith(ERROR_PREFIX):
                    self.error_line = text.removeprefix(ERROR_PREFIX)
                    self.reported = verbatim
        stream.close()

    def wait_and_report(self, done: queue.Queue[int]) -> None:
        """Block until the process exits and its stderr is drained, then enqueue the rank."""
        self.proc.wait()
        self.reader.join(timeout=2.0)
        done.put(self.rank)

    def describe_failure(self) -> str:
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                status = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                status = f"killed by signal {-rc}"
        else:
            status = f"exit {rc}"
        detail = self.error_line or self.last_line or "no error output"
        return f"rank {self.rank} failed ({status}): {detail}"


def _terminate(ranks: Sequence[_Rank], grace_s: float) -> None:
    """SIGTERM every live rank, then SIGKILL whatever is still alive after ``grace_s``."""
    live = [r for r in ranks if r.proc.poll() is None]
    for r in live:
        r.proc.terminate()
    deadline = time.monotonic() + grace_s
    for r in live:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        r.reader.join(timeout=2.0)


def _spawn(
    argv: Sequence[str], nprocs: int, port: int, env: Mapping[str, str] | None, stdin_to_rank0: bool
) -> list[_Rank]:
    cmd = [sys.executable, "-m", WORKER_MODULE, *argv]
    ranks: list[_Rank] = []
    try:
        for rank in range(nprocs):
            proc = subprocess.Popen(
                cmd,
                env=worker_env(rank, nprocs, port, env),
                stdin=None if stdin_to_rank0 and rank == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                bufsize=1,
            )
            prefix = f"[rank {rank}] " if nprocs > 1 else ""
            ranks.append(_Rank(rank, proc, prefix))
    except BaseException:
        _terminate(ranks, 0.0)
        raise
    for r in ranks:
        r.reader.start()
    return ranks


def spawn_workers(
    argv: Sequence[str],
    nprocs: int,
    port: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    grace_s: float = 5.0,
    stdin_to_rank0: bool = False,
) -> LaunchOutcome:
    """Run ``python -m tpcompile.runtime.worker *argv`` as ``nprocs`` local ranks.

    Each rank's stderr is forwarded (prefixed ``[rank N]`` unless the line is
    marked verbatim); stdout is inherited, so rank 0's streamed text goes
    straight to ours.  Rank 0 inherits stdin when ``stdin_to_rank0``, the
    others read from /dev/null.  As soon as one rank exits non-zero the
    others are terminated (SIGTERM, then SIGKILL after ``grace_s``).  Always
    spawns, even under torchrun.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ranks = _spawn(argv, nprocs, port if port is not None else free_port(), env, stdin_to_rank0)
    done: queue.Queue[int] = queue.Queue()
    for r in ranks:
        threading.Thread(
            target=r.wait_and_report, args=(done,), name=f"rank{r.rank}-wait", daemon=True
        ).start()
    finished: set[int] = set()
    try:
        while len(finished) < nprocs:
            try:
                rank = done.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            finished.add(rank)
            failed = ranks[rank]
            rc = failed.proc.returncode
            if rc != 0:
                _terminate(ranks, grace_s)
                code = rc if rc is not None and rc > 0 else EXIT_FAILURE
                if failed.reported and rc is not None and rc > 0:
                    return LaunchOutcome(code, failed.error_line, rank, reported=True)
                return LaunchOutcome(code, failed.describe_failure(), rank)
    except KeyboardInterrupt:
        _terminate(ranks, grace_s)
        return LaunchOutcome(EXIT_INTERRUPTED, "interrupted")
    except BaseException:
        _terminate(ranks, grace_s)
        raise
    return LaunchOutcome(EXIT_OK)


def launch(
    argv_for_worker: list[str], nprocs: int, port: int | None = None, *, stdin_to_rank0: bool = False
) -> int:
    """Spawn ``nprocs`` local workers and return the job's exit code.

    Returns :data:`RUN_IN_PROCESS` without spawning when running under
    torchrun (``RANK`` and ``WORLD_SIZE`` set); the caller must then run the
    worker in the current process.  On failure prints
    ``tprun: error: rank N failed (exit S): <reason>`` to stderr, unless the
    rank already reported its error verbatim.
    """
    if in_torchrun():
        return RUN_IN_PROCESS
    outcome = spawn_workers(argv_for_worker, nprocs, port, stdin_to_rank0=stdin_to_rank0)
    if outcome.message and not outcome.reported:
        print_error(outcome.message)
    return outcome.returncode
