"""Uniform one-line error reporting and exit codes for the runtime entry points.

Workers spawned by ``tprun`` have their stderr forwarded with a ``[rank N]``
prefix.  A line meant for the user as is (the generation summary, an error
every rank hit identically) is written with :func:`print_verbatim`, which
marks it with :data:`VERBATIM_MARK` so that the launcher strips the mark and
forwards the line without a prefix.

Invariant: an exception reaches the user as one ``tprun: error:`` line (a
traceback only with ``--debug``), and its type (or a failed rank's own code) decides the exit code:
Ctrl-C is 130, SIGTERM (:class:`~tpcompile.runtime.errors.Terminated`) 143.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from .errors import CollectiveError, LaunchError, PromptError, RuntimeArtifactError, Terminated, first_line

__all__ = [
    "ERROR_PREFIX",
    "WARNING_PREFIX",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USER_ERROR",
    "LAUNCHER_PID_ENV",
    "VERBATIM_MARK",
    "print_error",
    "print_verbatim",
    "report_exception",
]

PROG = "tprun"
ERROR_PREFIX = f"{PROG}: error: "
WARNING_PREFIX = f"{PROG}: warning: "
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure (a bug, or a crash inside torch)
EXIT_USER_ERROR = 2  # RuntimeArtifactError: something the user can fix
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)
#: Set in spawned workers' environment to the launcher's pid.
LAUNCHER_PID_ENV = "TPRUN_LAUNCHER_PID"
#: First character of a worker's stderr line that the launcher forwards unprefixed.
VERBATIM_MARK = "\x1e"
#: How the C++ transport (``kernels/cpu_ops.cpp``) opens the message of a failed collective.
NATIVE_COLLECTIVE_MARK = "tpcompile collective: "
#: ``[.../gloo/transport/tcp/pair.cc:589] `` opening a message raised by a collective backend.
_BACKEND_SOURCE = re.compile(r"^\[[^\]\s]+/(?:gloo|nccl|c10d)/[^\]\s]+:\d+\]\s*")


def print_error(message: str) -> None:
    """Print ``tprun: error: <message>`` to stderr."""
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)


def print_verbatim(line: str) -> None:
    """Print ``line`` to stderr so that it reaches the user without a ``[rank N]`` prefix."""
    mark = VERBATIM_MARK if LAUNCHER_PID_ENV in os.environ else ""
    print(f"{mark}{line}", file=sys.stderr, flush=True)


def report_exception(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` as one line (plus a traceback if ``debug``); return the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, Terminated):
        print_error("terminated")
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        print_error("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, PromptError) and exc.reported:  # a rank already printed it
        return EXIT_USER_ERROR
    if isinstance(exc, RuntimeArtifactError):
        print_error(first_line(exc))
        if isinstance(exc, LaunchError) and exc.exit_code is not None:  # a rank failed: its exit code
            return exc.exit_code
        return EXIT_USER_ERROR
    if isinstance(exc, CollectiveError):  # a peer died or --timeout expired: the message says which
        print_error(first_line(exc))
        return EXIT_FAILURE
    if first_line(exc).startswith(NATIVE_COLLECTIVE_MARK):  # the same, from the C++ transport (cpu_ops)
        print_error(first_line(exc).removeprefix(NATIVE_COLLECTIVE_MARK))
        return EXIT_FAILURE
    backend_failure = _BACKEND_SOURCE.sub("", first_line(exc), count=1)
    if backend_failure != first_line(exc):  # e.g. gloo: "Timed out waiting 300000ms for recv ..."
        print_error(f"collective failed: {backend_failure}")
        return EXIT_FAILURE
    hint = "" if debug else " (rerun with --debug for a traceback)"
    print_error(f"{type(exc).__name__}: {first_line(exc)}{hint}")
    return EXIT_FAILURE
