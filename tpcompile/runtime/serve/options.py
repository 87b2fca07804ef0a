"""What a rank of ``tprun serve`` is told (:class:`ServeArgs`, a field of the worker's arguments).

Invariant: standard library only (the worker's arguments are built before torch is imported).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServeArgs"]


@dataclass(frozen=True)
class ServeArgs:
    """A rank serves requests: rank 0 connects to the front process's Unix ``socket``."""

    socket: Path
