"""Spawning one worker process per rank on this machine and supervising them.

Every rank runs :mod:`tpcompile.runtime.launch.worker` with the run's
:class:`~tpcompile.runtime.launch.args.WorkerArgs` as its one JSON argument;
:func:`run_ranks` is the one place that interprets how the job ended.

Faults: the ranks run in their own session, so a terminal's Ctrl-C reaches
only the launcher, which then stops every rank (SIGTERM, then SIGKILL) and
exits 130 (143 after a SIGTERM of the launcher).  When one rank exits
abnormally the launcher stops the others at once and reports that rank; a
rank whose launcher dies is SIGKILLed by the kernel.  Shared-memory segments
a killed rank 0 could leave are removed.

Invariant: :func:`spawn_workers` returns only when every rank has exited.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from ..cpu_bind import CPUS_ENV, rank_cpu_sets
from ..errors import LaunchError, PromptError, Terminated
from ..reporting import (
    ERROR_PREFIX,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    LAUNCHER_PID_ENV,
    VERBATIM_MARK,
)
from ..transport.segments import remove_segments
from .args import WorkerArgs
from .lifetime import stop_signals_deferred
from .nodes import LOCALHOST, Nodes

__all__ = [
    "LAUNCHER_PID_ENV",
    "WORKER_MODULE",
    "LaunchOutcome",
    "check_port_free",
    "free_port",
    "run_ranks",
    "spawn_workers",
    "worker_env",
]

WORKER_MODULE: Final = "tpcompile.runtime.launch.worker"
#: What a spawned rank runs (``python -c``) before importing anything heavy: get SIGKILLed when the
#: launcher dies (:func:`~tpcompile.runtime.launch.lifetime.die_with_parent`; called here rather than in a
#: ``preexec_fn``, which is unsafe in a process with threads), pin itself to its CPUs (``--cpu-bind``) before
#: torch starts any thread, then run the worker.
_BOOTSTRAP: Final = f"""\
import os, runpy
from tpcompile.runtime.launch.lifetime import die_with_parent
from tpcompile.runtime.cpu_bind import bind_from_env
die_with_parent(int(os.environ[{LAUNCHER_PID_ENV!r}]))
bind_from_env()
runpy.run_module({WORKER_MODULE!r}, run_name="__main__", alter_sys=True)
"""
_POLL_S = 0.1
#: What a native program (an AOTInductor package) prints itself when a call inside it raises: the call's
#: place in the generated code. The error follows as the rank's own ``tprun: error:`` line; this is noise.
_NATIVE_CALL_FAILED = re.compile(r"^Error: .* API call failed at \S+\.cpp, line \d+$")
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


def check_port_free(port: int) -> None:
    """Raise :class:`LaunchError` if something already listens on (or holds) TCP ``port`` locally.

    Binds the way the rendezvous store does (all addresses, ``SO_REUSEADDR``), so
    a port left in TIME_WAIT by a previous run still counts as free.
    """
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # family unavailable on this host
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    reason = "already in use" if exc.errno == errno.EADDRINUSE else "not allowed"
                    raise LaunchError(
                        f"rendezvous port {port} is {reason}; pass another --port or omit --port "
                        "to pick a free one"
                    ) from None
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise


def _package_root() -> Path | None:
    """Directory to put on PYTHONPATH so children can import an uninstalled tpcompile."""
    root = Path(__file__).resolve().parents[3]  # .../tpcompile/runtime/launch/launcher.py
    if any(part in ("site-packages", "dist-packages") for part in root.parts):
        return None
    return root


def worker_env(
    rank: int,
    nprocs: int,
    port: int,
    base: Mapping[str, str] | None = None,
    cpus: Sequence[int] | None = None,
    nodes: Nodes | None = None,
) -> dict[str, str]:
    """Environment for local rank ``rank`` of ``nprocs`` (env:// rendezvous on 127.0.0.1, or on the
    master address of ``nodes``: then global rank and world size span every host), pinned to ``cpus``
    when given (one thread per CPU unless ``OMP_NUM_THREADS`` says otherwise)."""
    nodes = nodes or Nodes()
    env = dict(os.environ if base is None else base)
    env.pop(CPUS_ENV, None)
    if cpus:
        env[CPUS_ENV] = ",".join(map(str, cpus))
        env.setdefault("OMP_NUM_THREADS", str(len(cpus)))
    env.update(
        MASTER_ADDR=nodes.master_addr,
        MASTER_PORT=str(port),
        RANK=str(nodes.node_rank * nprocs + rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs * nodes.nnodes),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nprocs)))
    root = _package_root()
    if root is not None:
        paths = [str(root), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class _Rank:
    """A spawned rank: its process, a thread forwarding stderr, and its last words.

    A rank's own ``tprun: error:`` line is held back, not forwarded: the launcher reports the failed rank
    with that error in one line (an error is printed once, not once per rank and again by the launcher).
    A native program's own line about the failed call inside it is dropped (the error line says why).
    """

    def __init__(self, rank: int, proc: subprocess.Popen[str], prefix: str) -> None:
        self.rank = rank
        self.proc = proc
        self.prefix = prefix
        self.last_line = ""
        self.error_line = ""
        self.reported = False
        self.held: list[str] = []  # error lines not forwarded (printed only if no failure reports them)
        self.reader = threading.Thread(target=self._pump, name=f"rank{rank}-stderr", daemon=True)

    def _pump(self) -> None:
        stream: IO[str] | None = self.proc.stderr
        if stream is None:
            return
        for line in stream:
            if _NATIVE_CALL_FAILED.match(line.rstrip("\n")):
                continue
            verbatim = line.startswith(VERBATIM_MARK)
            if verbatim:
                line = line.removeprefix(VERBATIM_MARK)
            if not verbatim and line.startswith(ERROR_PREFIX):
                self.held.append(self.prefix + line)
            else:
                _write(line if verbatim else self.prefix + line)
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
        """``rank N failed (STATUS): DETAIL``; a signal death only shows an explicit error line."""
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                status = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                status = f"killed by signal {-rc}"
            if -rc == signal.SIGKILL:
                status += ", e.g. by the out-of-memory killer"
            detail = self.error_line
        else:
            status = f"exit {rc}"
            detail = self.error_line or self.last_line or "no error output"
        return f"rank {self.rank} failed ({status})" + (f": {detail}" if detail else "")


def _write(text: str) -> None:
    with _STDERR_LOCK:
        sys.stderr.write(text)
        sys.stderr.flush()


def _terminate(ranks: Sequence[_Rank], grace_s: float) -> None:
    """SIGTERM every live rank (and SIGCONT a stopped one), then SIGKILL whatever is still alive after
    ``grace_s``; finally remove shared-memory segments rank 0 may have left."""
    live = [r for r in ranks if r.proc.poll() is None]
    for r in live:
        r.proc.terminate()
        r.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    for r in live:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
    for r in ranks:
        r.reader.join(timeout=2.0)
    if ranks:
        remove_segments(ranks[0].proc.pid)


def _spawn(
    argv: Sequence[str],
    nprocs: int,
    port: int,
    env: Mapping[str, str] | None,
    rank0_stdin: IO[Any] | None,
    cpu_sets: Sequence[Sequence[int]] | None,
    nodes: Nodes,
) -> list[_Rank]:
    cmd = [sys.executable, "-c", _BOOTSTRAP, *argv]
    ranks: list[_Rank] = []
    first = nodes.node_rank * nprocs  # the global rank of local rank 0
    try:
        for rank in range(nprocs):
            proc = subprocess.Popen(
                cmd,
                env=worker_env(rank, nprocs, port, env, cpu_sets[rank] if cpu_sets else None, nodes),
                stdin=rank0_stdin if rank0_stdin is not None and first + rank == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the ranks
                text=True,
                errors="replace",
                bufsize=1,
            )
            prefix = f"[rank {first + rank}] " if nprocs * nodes.nnodes > 1 else ""
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
    rank0_stdin: IO[Any] | None = None,
    cpu_sets: Sequence[Sequence[int]] | None = None,
    nodes: Nodes | None = None,
) -> LaunchOutcome:
    """Run ``python -m tpcompile.runtime.launch.worker *argv`` as ``nprocs`` local ranks (via a bootstrap
    that ties each rank's lifetime to this process).

    Each rank's stderr is forwarded (prefixed ``[rank N]`` unless the line is
    marked verbatim) except its own error line, which the outcome's message
    carries (so an error is printed once); stdout is inherited, so rank 0's streamed text goes
    straight to ours.  Rank 0 reads ``rank0_stdin`` (a file, or our own
    stdin) when given; the others, and rank 0 otherwise, read from /dev/null.  Rank r is pinned to
    ``cpu_sets[r]`` when given (:mod:`tpcompile.runtime.cpu_bind`).  With ``nodes`` (a job over several
    hosts) these are this host's ranks, and the rendezvous is on ``nodes.master_addr``.
    As soon as one rank exits non-zero the others are terminated (SIGTERM,
    then SIGKILL after ``grace_s``); so are all of them on KeyboardInterrupt
    (Ctrl-C), which returns exit code 130, and on
    :class:`~tpcompile.runtime.errors.Terminated` (SIGTERM), which returns 143.
    Always spawns, even under torchrun.

    Raises:
        LaunchError: ``port`` is given but already in use.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    nodes = nodes or Nodes()
    if nodes.master_port is not None:
        port = nodes.master_port
    if port is None:
        port = free_port()
    elif nodes.hosts_rank0 and nodes.master_addr in (LOCALHOST, "localhost"):
        check_port_free(port)  # rank 0's store listens here (on another host's address: not checkable)
    with stop_signals_deferred() as deliver_stop_signals:  # Ctrl-C acts between polls, not inside queue.get
        ranks = _spawn(argv, nprocs, port, env, rank0_stdin, cpu_sets, nodes)
        done: queue.Queue[int] = queue.Queue()
        for r in ranks:
            threading.Thread(
                target=r.wait_and_report, args=(done,), name=f"rank{r.rank}-wait", daemon=True
            ).start()
        finished: set[int] = set()
        try:
            while len(finished) < nprocs:
                deliver_stop_signals()
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
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            _terminate(ranks, grace_s)
            if isinstance(exc, Terminated):
                return LaunchOutcome(EXIT_TERMINATED, "terminated")
            return LaunchOutcome(EXIT_INTERRUPTED, "interrupted")
        except BaseException:
            _terminate(ranks, grace_s)
            raise
    for r in ranks:  # error lines of ranks that then exited 0: nothing else reported them
        _write("".join(r.held))
    return LaunchOutcome(EXIT_OK)


def run_ranks(
    args: WorkerArgs,
    nprocs: int,
    port: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    rank0_stdin: IO[Any] | None = None,
    result: Path | None = None,
    nodes: Nodes | None = None,
) -> None:
    """Run ``args`` as ``nprocs`` spawned local ranks (:func:`spawn_workers`; with ``nodes``, this host's
    ``nprocs / nnodes`` of them); return once every rank exited 0 and, when ``result`` is given, rank 0
    wrote that file.

    This is the one place that turns a :class:`LaunchOutcome` into a result or an error, for ``tprun``,
    ``run_artifact`` and ``generate_text`` alike.

    Raises:
        PromptError: a rank rejected a prompt and already said so on stderr (``reported``).
        LaunchError: a rank failed (``exit_code`` is the job's: the rank's code, 130 after Ctrl-C; the
            message names the rank and its error; 143 after SIGTERM), ``port`` is in use, or rank 0 wrote
            no ``result``.
    """
    nodes = nodes or Nodes()
    nodes.check(nprocs)
    local = nodes.local_ranks(nprocs)
    cpu_sets = rank_cpu_sets(args.cpu_bind, local, os.environ if env is None else env)
    outcome = spawn_workers(
        [args.to_json()], local, port, env=env, rank0_stdin=rank0_stdin, cpu_sets=cpu_sets, nodes=nodes
    )
    if outcome.reported and outcome.message:
        raise PromptError(outcome.message, reported=True)  # every rank rejected the prompt the same way
    if outcome.returncode != 0:
        message = outcome.message or f"workers failed with exit code {outcome.returncode}"
        raise LaunchError(message, exit_code=outcome.returncode)
    if result is not None and nodes.hosts_rank0 and not result.is_file():
        raise LaunchError(f"workers exited successfully but rank 0 wrote no {result.name}")
