"""Typed errors of the compiler. Each carries the exit code the CLI returns and a one-line message."""

from __future__ import annotations

#: Exit codes of ``tpcompile`` (documented in the README's "Exit codes" table; a test keeps them in sync).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug, or ``verify`` found outputs that differ
EXIT_USAGE = 2  # bad input the user can fix, or an environment that refuses the output (a full disk)
EXIT_UNSUPPORTED = 3  # the model is readable but cannot be captured or sharded
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


class TpCompileError(Exception):
    """Base class: ``str(err)`` is a one-line message a user can act on."""

    exit_code = EXIT_INTERNAL


class UsageError(TpCompileError):
    """Bad input from the user: a missing file, an invalid option, an unreadable model."""

    exit_code = EXIT_USAGE


class OutputError(TpCompileError):
    """The environment refuses the output (a full disk): not a bug, and nothing was left behind."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(TpCompileError):
    """The model is readable but the compiler cannot shard or capture it correctly."""

    exit_code = EXIT_UNSUPPORTED


class VerificationError(TpCompileError):
    """``tpcompile verify`` found outputs that differ from the reference beyond the tolerance."""

    exit_code = EXIT_INTERNAL
