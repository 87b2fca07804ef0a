"""Placements: how one tensor is laid out over the ``tp`` ranks of a 1-D group, and their text form.

Invariants: a placement is a small immutable value. ``Shard`` records the size of every rank's slice, so
uneven splits are exact; nothing assumes ``size // tp``. ``parse_placement(str(p)) == p`` for every
placement ``p``, and :func:`parse_placement` reads exactly the forms ``str`` writes:

* ``R`` (:class:`Replicate`) and ``P`` (:class:`Partial`);
* ``S(dim;s_0,...,s_{tp-1})`` and, for overlapping slices, ``S(dim;sizes@start_0,...)`` (:class:`Shard`);
* ``B(dim;lo:hi=PL|lo:hi=PL|...)`` (:class:`Pieces`, each ``PL`` one of the forms above).

Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor, bit-identical."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a full-shaped tensor; the true value is the sum over ranks."""

    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    """Rank ``r`` holds the contiguous slice ``[offset(r), offset(r) + sizes[r])`` of dimension ``dim``.

    Normally the slices partition the dimension (``starts`` is None: each slice starts where the previous
    one ends). With explicit ``starts`` slices may overlap: rank r holds ``[starts[r], starts[r] + sizes[r])``
    and a piece held by several ranks is replicated among them (KV heads shared by the query heads of more
    than one rank). An overlapping shard is never summed over its dim or turned into a partial sum.
    ``dim`` may be negative (counted from the end).
    """

    dim: int
    sizes: tuple[int, ...]
    starts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.starts is not None and self.starts == _cumulative(self.sizes):
            object.__setattr__(self, "starts", None)

    def offset(self, rank: int) -> int:
        return self.starts[rank] if self.starts is not None else sum(self.sizes[:rank])

    @property
    def total(self) -> int:
        if self.starts is None:
            return sum(self.sizes)
        return max(s + z for s, z in zip(self.starts, self.sizes, strict=True))

    @property
    def overlapping(self) -> bool:
        return self.starts is not None

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1 and self.starts is None

    def with_dim(self, dim: int) -> Shard:
        return Shard(dim, self.sizes, self.starts)

    def scaled(self, num: int, den: int = 1) -> Shard:
        """The same split with every size (and start) multiplied by ``num / den`` (exact, or ValueError)."""
        values = self.sizes + (self.starts or ())
        if any((s * num) % den for s in values):
            raise ValueError(f"sizes {self.sizes} are not divisible by {den}")
        starts = None if self.starts is None else tuple(s * num // den for s in self.starts)
        return Shard(self.dim, tuple(s * num // den for s in self.sizes), starts)

    def __str__(self) -> str:
        sizes = ",".join(map(str, self.sizes))
        if self.starts is not None:
            return f"S({self.dim};{sizes}@{','.join(map(str, self.starts))})"
        return f"S({self.dim};{sizes})"


def _cumulative(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return tuple(out)


Placement = Replicate | Partial | Shard


@dataclass(frozen=True)
class Pieces:
    """A stored tensor cut along ``dim`` into consecutive pieces ``[lo, hi)``, each with its own placement
    (relative to the piece): rank r stores its part of every piece, concatenated in piece order.

    This is how a fused projection is stored: GPT-2's ``c_attn`` is read as three pieces (q, k, v), each
    split by heads, so rank r holds ``[q_r; k_r; v_r]``. Only stored tensors have this placement; the graph
    reads each piece through its own slice, whose bounds are rewritten to the rank's local offsets.
    """

    dim: int
    parts: tuple[tuple[int, int, Placement], ...]

    def local_size(self, index: int, rank: int) -> int:
        lo, hi, pl = self.parts[index]
        if isinstance(pl, Shard) and pl.dim == self.dim:
            return pl.sizes[rank]
        return hi - lo

    def local_offset(self, index: int, rank: int) -> int:
        return sum(self.local_size(i, rank) for i in range(index))

    def index(self, lo: int, hi: int) -> int:
        return next(i for i, (a, b, _) in enumerate(self.parts) if (a, b) == (lo, hi))

    def __str__(self) -> str:
        return f"B({self.dim};" + "|".join(f"{lo}:{hi}={pl}" for lo, hi, pl in self.parts) + ")"


RootPlacement = Placement | Pieces

REPLICATE = Replicate()
PARTIAL = Partial()


def balanced_split(units: int, tp: int) -> tuple[int, ...]:
    """Split ``units`` whole units over ``tp`` ranks, the first ranks taking the remainder:
    6 over 4 -> 2,2,1,1."""
    base, extra = divmod(units, tp)
    return tuple(base + (1 if r < extra else 0) for r in range(tp))


_INTS = r"\d+(?:,\d+)*"
_SHARD = re.compile(rf"^S\((-?\d+);({_INTS})(?:@({_INTS}))?\)$")
_PIECES = re.compile(r"^B\((-?\d+);(.+)\)$")
_PIECE = re.compile(r"^(\d+):(\d+)=(.+)$")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def _parse_simple(text: str) -> Placement | None:
    if text == "R":
        return REPLICATE
    if text == "P":
        return PARTIAL
    match = _SHARD.match(text)
    if match is None:
        return None
    sizes = _ints(match.group(2))
    starts = _ints(match.group(3)) if match.group(3) else None
    if starts is not None and len(starts) != len(sizes):
        return None
    return Shard(int(match.group(1)), sizes, starts)


def parse_placement(text: str) -> RootPlacement:
    """Inverse of ``str(placement)`` for every placement, :class:`Pieces` included.

    Raises:
        ValueError: ``text`` is none of the forms listed in the module docstring.
    """
    simple = _parse_simple(text)
    if simple is not None:
        return simple
    match = _PIECES.match(text)
    if match is not None:
        parts = []
        for piece in match.group(2).split("|"):
            found = _PIECE.match(piece)
            inner = _parse_simple(found.group(3)) if found is not None else None
            if found is None or inner is None:
                break
            parts.append((int(found.group(1)), int(found.group(2)), inner))
        else:
            return Pieces(int(match.group(1)), tuple(parts))
    raise ValueError(f"not a placement: {text!r}")
