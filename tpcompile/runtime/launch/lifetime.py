"""How long the processes of ``tprun`` and ``tpcompile`` live: no child outlives its parent, and SIGTERM
stops a command the way Ctrl-C does.

Invariants: after :func:`die_with_parent`, the kernel SIGKILLs the process as soon as the parent dies
(Linux ``PR_SET_PDEATHSIG``; strictly, when the parent's thread that started it ends, so parents start
their children from the main thread), and the process has already exited if the parent was gone before.
After :func:`stop_on_sigterm`, the first SIGTERM raises :class:`~tpcompile.runtime.errors.Terminated` (a
``KeyboardInterrupt``) in the main thread and later ones are ignored, so the cleanup runs once, undisturbed.
Within :func:`stop_signals_deferred`, SIGINT and SIGTERM run their handlers only where the block asks for
them, never in the middle of library code. :func:`end_process` ends a command whose work is done as a normal
exit would, without the interpreter's module teardown.
Standard library only: a child calls this before importing anything heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn

from ..errors import Terminated

__all__ = [
    "EXIT_PARENT_GONE",
    "die_with_parent",
    "end_process",
    "exit_status",
    "stop_on_sigterm",
    "stop_signals_deferred",
    "stop_signals_held",
    "worker_signals",
]

_PR_SET_PDEATHSIG = 1
#: Exit code of a child that finds its parent already gone.
EXIT_PARENT_GONE = 1


def die_with_parent(parent_pid: int) -> None:
    """Have this process SIGKILLed when ``parent_pid`` (its parent) dies; exit now if it already did."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # reparented before the line above took effect
        os._exit(EXIT_PARENT_GONE)


def _terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one cleanup, not interrupted by a second SIGTERM
    raise Terminated()


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (see the module invariant)."""
    signal.signal(signal.SIGTERM, _terminated)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold back Ctrl-C and SIGTERM while starting a worker: the worker starts with them blocked (a
    forked one would otherwise run the parent's handlers until :func:`worker_signals`); here they arrive
    when the block ends."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[Callable[[], None]]:
    """Record SIGINT and SIGTERM within the block; the handler each had before runs (and may raise
    ``KeyboardInterrupt`` or :class:`Terminated`) only when the block calls the yielded ``deliver()``.

    A ``KeyboardInterrupt`` raised asynchronously can land between a lock's release and its re-acquire
    inside ``queue.get`` (``Condition.wait``), and the stop then surfaces as ``RuntimeError: release
    unlocked lock`` instead of a clean stop. A signal ignored on entry stays ignored; one whose handler was
    the default raises ``KeyboardInterrupt`` (SIGINT) or :class:`Terminated` (SIGTERM); a disposition a
delivered handler sets (``stop_on_sigterm``'s: ignore later SIGTERMs) is kept after the block. Signals still
    pending when the block ends are dropped: the block is the cleanup they asked for. Outside the main
    thread (where no signal handler runs) ``deliver`` does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pending: list[int] = []
    previous = {int(signum): signal.getsignal(signum) for signum in _STOP_SIGNALS}

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    def deliver() -> None:
        while pending:
            signum = pending.pop(0)
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif signum == signal.SIGTERM:
                raise Terminated()
            else:
                raise KeyboardInterrupt()

    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, record)
    try:
        yield deliver
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is record:  # a delivered handler's own change (SIG_IGN) stays
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def worker_signals() -> None:
    """In a worker process started under :func:`stop_signals_held`: Ctrl-C is its parent's to handle (the
    parent stops it), SIGTERM kills at once (undoing a handler inherited through ``fork``); then the two
    signals are let through."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def exit_status(done: SystemExit) -> int:
    """The status the interpreter would exit with for ``done``; a message instead of a code is printed to
    stderr, as the interpreter does, and gives 1."""
    if isinstance(done.code, int):
        return done.code
    if done.code is None:
        return 0
    print(done.code, file=sys.stderr)
    return 1


def end_process(status: int) -> NoReturn:
    """End this process with ``status`` once its command is done, as a normal exit does (its threads that
    are not daemons are waited for, the exit handlers run, stdout and stderr are flushed) but without the
    interpreter tearing down every module one by one: ~0.9 s for a ``tprun`` rank with torch loaded, ~1.7 s
    for a process with transformers too (2026-12-03). Whatever the command holds outside the process must be
    released by then (its ``finally`` blocks and exit handlers do it)."""
    # What the interpreter runs first at exit (not in typeshed): it tells thread pools left open to stop,
    # then waits for every thread that is not a daemon.
    wait_for_threads = getattr(threading, "_shutdown", None)
    if wait_for_threads is not None:
        wait_for_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing left to say
            stream.flush()
    os._exit(status)
