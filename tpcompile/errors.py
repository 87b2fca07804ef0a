"""Typed errors of the compiler. Each carries the exit code the CLI returns and a one-line message."""

from __future__ import annotations


class TpCompileError(Exception):
    """Base class: ``str(err)`` is a one-line message a user can act on."""

    exit_code = 1


class UsageError(TpCompileError):
    """Bad input from the user: a missing file, an invalid option, an unreadable model."""

    exit_code = 2


class UnsupportedModelError(TpCompileError):
    """The model is readable but the compiler cannot shard or capture it correctly."""

    exit_code = 3


class VerificationError(TpCompileError):
    """``tpcompile verify`` found outputs that differ from the reference beyond the tolerance."""

    exit_code = 1
