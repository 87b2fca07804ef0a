"""Placements as the compiler's passes use them: the value types of the artifact format, re-exported.

Invariant: there is one placement algebra, defined with its text form in
:mod:`tpcompile.runtime.format.placement` (what the manifest records and the runtime reads); this module
only gives the passes their historical import path.
"""

from __future__ import annotations

from tpcompile.runtime.format.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Pieces,
    Placement,
    Replicate,
    RootPlacement,
    Shard,
    balanced_split,
    parse_placement,
)

__all__ = [
    "PARTIAL",
    "REPLICATE",
    "Partial",
    "Pieces",
    "Placement",
    "Replicate",
    "RootPlacement",
    "Shard",
    "balanced_split",
    "parse_placement",
]
