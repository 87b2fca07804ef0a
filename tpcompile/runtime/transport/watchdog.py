"""A rank that stops making progress ends itself with one line, on backends that would only abort (NCCL).

NCCL runs collectives asynchronously on the GPU: the host waits only when it next needs a value (the
chosen token), inside a CUDA call that no Python exception interrupts, and NCCL's own watchdog answers a
timeout by aborting the process with pages of log.  So a CUDA rank arms a :class:`ProgressWatchdog` while
it works (a prompt's generation, a forward pass) and beats it at every token; a thread of its own ends the
rank the way the CPU transport does (:mod:`.shm`): ``tprun: error: collective timed out after S s ...`` or
``tprun: error: rank N (pid P) exited during a collective``, exit code 1.

Invariants:
- armed, a rank whose last beat (or arming) is more than ``timeout_s`` old, or one of whose same-host peers
  no longer exists, prints exactly one error line and exits with code 1 at once (``os._exit``: its main
  thread may be blocked inside CUDA);
- disarmed (between prompts, waiting for stdin), it never fires;
- the NCCL process group times out :data:`NCCL_TIMEOUT_GRACE_S` later than this watchdog
  (:func:`~tpcompile.runtime.transport.distributed.init_group`), so its abort never comes first.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import torch.distributed as dist
from torch.distributed import distributed_c10d

from ..reporting import EXIT_FAILURE, print_error
from .segments import process_alive

__all__ = ["NCCL_TIMEOUT_GRACE_S", "ProgressWatchdog", "same_host_peers"]

#: How much later than ``--timeout`` the NCCL process group gives up on a collective by itself.
NCCL_TIMEOUT_GRACE_S = 30.0
_POLL_S = 0.25


def _exit_with(message: str) -> None:
    print_error(message)
    os._exit(EXIT_FAILURE)


class ProgressWatchdog:
    """Ends the process (see the module invariants) when armed work stalls for ``timeout_s`` or a peer in
    ``peers`` (rank -> pid, same host) exits; ``on_fire`` replaces the exit (tests)."""

    def __init__(
        self,
        timeout_s: float,
        peers: Mapping[int, int] | None = None,
        *,
        on_fire: Callable[[str], None] = _exit_with,
        poll_s: float = _POLL_S,
    ) -> None:
        self.timeout_s = timeout_s
        self.peers = dict(peers or {})
        self.on_fire = on_fire
        self.poll_s = poll_s
        self._last: float | None = None  # monotonic time of the last beat while armed, None disarmed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """The rank made progress (a token was agreed on)."""
        if self._last is not None:
            self._last = time.monotonic()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Armed for the duration of the block (the clock starts at entry)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="tpcompile-watchdog", daemon=True)
            self._thread.start()
        self._last = time.monotonic()
        try:
            yield
        finally:
            self._last = None

    def close(self) -> None:
        """Stop the thread (it would end with the process anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _problem(self) -> str | None:
        last = self._last
        if last is None:
            return None
        for rank, pid in sorted(self.peers.items()):
            if not process_alive(pid):
                return f"rank {rank} (pid {pid}) exited during a collective"
        if time.monotonic() - last > self.timeout_s:
            return (
                f"collective timed out after {self.timeout_s:g} s without progress "
                "(raise --timeout if a rank is legitimately this slow)"
            )
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            problem = self._problem()
            if problem is not None:
                self.on_fire(problem)
                return


def same_host_peers(rank: int, world: int, store: dist.Store | None = None) -> dict[int, int]:
    """The other ranks of the job that run on this host: rank -> pid.  Collective: every rank publishes
    ``host pid`` in ``store`` (default: the default group's rendezvous store) and reads the others'."""
    if world == 1:
        return {}
    store = store if store is not None else distributed_c10d._get_default_store()
    host = socket.gethostname()
    store.set(f"tpcompile/peer/{rank}", f"{host} {os.getpid()}")
    peers = {}
    for other in range(world):
        if other == rank:
            continue
        other_host, pid = store.get(f"tpcompile/peer/{other}").decode().rsplit(" ", 1)
        if other_host == host:
            peers[other] = int(pid)
    return peers
