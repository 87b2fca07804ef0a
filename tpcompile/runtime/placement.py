"""Output placements as written in ``manifest.json``: ``"R"`` or ``"S(dim;s0,s1,...)"``.

Invariant: a :class:`Placement` with ``dim`` set has exactly one size per rank,
every size >= 0, and rank ``r`` holds the slice
``[sum(sizes[:r]), sum(sizes[:r + 1]))`` of dimension ``dim`` of the global
tensor.  ``dim`` may be negative (counted from the end).  This module depends
on the standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ManifestError

__all__ = ["REPLICATED", "Placement", "parse_placement"]

_SHARD = re.compile(r"^S\((-?\d+);(\d+(?:,\d+)*)\)$")


@dataclass(frozen=True)
class Placement:
    """Where each rank's copy of a tensor sits in the global tensor.

    ``dim is None`` means replicated: every rank holds the whole tensor.
    """

    dim: int | None = None
    sizes: tuple[int, ...] = ()

    @property
    def is_sharded(self) -> bool:
        """True for ``S(...)``: ranks hold disjoint slices."""
        return self.dim is not None

    @property
    def total(self) -> int:
        """Size of the sharded dimension of the global tensor."""
        return sum(self.sizes)

    @property
    def max_size(self) -> int:
        """Largest per-rank slice (the padding target of a gather)."""
        return max(self.sizes) if self.sizes else 0

    def offset(self, rank: int) -> int:
        """Global index of the first element rank ``rank`` holds along ``dim``."""
        return sum(self.sizes[:rank])

    def size(self, rank: int) -> int:
        """Number of elements rank ``rank`` holds along ``dim``."""
        return self.sizes[rank]

    def __str__(self) -> str:
        if self.dim is None:
            return "R"
        return f"S({self.dim};{','.join(map(str, self.sizes))})"


REPLICATED = Placement()


def parse_placement(text: object, tp: int, where: str) -> Placement:
    """Parse a manifest placement string for an artifact with ``tp`` ranks.

    Raises:
        ManifestError: not ``R`` / ``S(dim;sizes)``, or the number of sizes is not ``tp``.
    """
    if text is None or text == "R":
        return REPLICATED
    match = _SHARD.match(text) if isinstance(text, str) else None
    if match is None:
        raise ManifestError(f"{where}: placement {text!r} must be 'R' or 'S(dim;size_0,...,size_{{tp-1}})'")
    sizes = tuple(int(s) for s in match.group(2).split(","))
    if len(sizes) != tp:
        raise ManifestError(
            f"{where}: placement {text!r} lists {len(sizes)} sizes but the artifact has tp={tp}"
        )
    return Placement(dim=int(match.group(1)), sizes=sizes)
