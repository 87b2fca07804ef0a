"""Typed exceptions raised by the tpcompile runtime.

Every exception carries a single-line message that tells the user what is
wrong and, where possible, what to do about it.  Entry points (``tprun`` and
the worker) print ``tprun: error: <message>`` and exit with status 2 for any
:class:`RuntimeArtifactError`.  :func:`first_line` is the one way the runtime
turns any exception (its own or one from torch, safetensors, onnxruntime...)
into such a line.

Invariant: every runtime error a user can act on is a :class:`RuntimeArtifactError`
whose ``str`` is one line.
"""

from __future__ import annotations

from collections.abc import Sized

__all__ = [
    "and_more",
    "ArtifactCorrupt",
    "ArtifactLoadError",
    "BackendError",
    "CollectiveError",
    "InputError",
    "LaunchError",
    "ManifestCorrupt",
    "ManifestError",
    "PromptError",
    "RuntimeArtifactError",
    "Terminated",
    "UntrustedContent",
    "first_line",
]


def and_more(items: Sized) -> str:
    """The suffix of a message that names only the first of ``items``: `` (and N more)``, or nothing."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def first_line(exc: BaseException) -> str:
    """First non-empty line of ``str(exc)``, stripped, or the exception type's name when there is none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (``timeout``, systemd, a CI runner): handled exactly like Ctrl-C, so every
    cleanup that Ctrl-C runs also runs, but reported as ``terminated`` with exit code 143 (128 + 15)."""


class CollectiveError(RuntimeError):
    """A collective cannot complete: a peer rank exited, or ``--timeout`` expired (exit code 1)."""


class RuntimeArtifactError(Exception):
    """Base class for user-actionable runtime errors (one-line message)."""


class ManifestError(RuntimeArtifactError):
    """manifest.json is missing, unreadable, malformed or unsupported."""


class ArtifactCorrupt(RuntimeArtifactError):
    """A file of the artifact does not match the hash recorded in the manifest."""


class ManifestCorrupt(ManifestError, ArtifactCorrupt):
    """manifest.json is not the file tpcompile wrote: not JSON, or its content digest differs."""


class ArtifactLoadError(RuntimeArtifactError):
    """A rank's program or weights cannot be loaded or do not fit together."""


class UntrustedContent(ArtifactLoadError):
    """A program archive holds pickled data or compiled code; it loads only with ``--trust-pickle``."""


class InputError(RuntimeArtifactError):
    """User-supplied inputs do not match the artifact's input specification."""


class BackendError(RuntimeArtifactError):
    """The requested distributed backend/device is unusable or misconfigured."""


class LaunchError(RuntimeArtifactError):
    """A worker process failed or the launch itself could not be performed.

    ``exit_code`` is the job's exit code when a rank failed (its own code, 130 after Ctrl-C), else None.
    """

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PromptError(InputError):
    """A prompt the artifact cannot serve (empty, or too long for its KV cache).

    Every rank detects it identically, so it is reported once (by rank 0);
    ``reported`` is True when a rank already showed it to the user.
    """

    def __init__(self, message: str, *, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported
