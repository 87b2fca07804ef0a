"""Uniform one-line error reporting and exit codes for the runtime entry points."""

from __future__ import annotations

import sys
import traceback

from .errors import RuntimeArtifactError

__all__ = [
    "ERROR_PREFIX",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "first_line",
    "print_error",
    "report_exception",
]

PROG = "tprun"
ERROR_PREFIX = f"{PROG}: error: "
EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure (a bug, or a crash inside torch)
EXIT_USER_ERROR = 2  # RuntimeArtifactError: something the user can fix
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException) -> str:
    """First non-empty line of ``str(exc)``, or the exception type's name."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def print_error(message: str) -> None:
    """Print ``tprun: error: <message>`` to stderr."""
    print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)


def report_exception(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` as one line (plus a traceback if ``debug``); return the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        print_error("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, RuntimeArtifactError):
        print_error(first_line(exc))
        return EXIT_USER_ERROR
    hint = "" if debug else " (rerun with --debug for a traceback)"
    print_error(f"{type(exc).__name__}: {first_line(exc)}{hint}")
    return EXIT_FAILURE
