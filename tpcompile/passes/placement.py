"""Placements: how one tensor is laid out over the ``tp`` ranks of a 1-D group.

Invariant: a placement is a small immutable value. ``Shard`` records the size of every rank's slice, so
uneven splits are exact; nothing in the compiler assumes ``size // tp``.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """Rank ``r`` holds the contiguous slice ``[offset(r), offset(r) + sizes[r])`` of dimension ``dim``."""

    dim: int
    sizes: tuple[int, ...]

    def offset(self, rank: int) -> int:
        return sum(self.sizes[:rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    def with_dim(self, dim: int) -> Shard:
        return Shard(dim, self.sizes)

    def scaled(self, num: int, den: int = 1) -> Shard:
        """The same split with every size multiplied by ``num / den`` (exact, or ValueError)."""
        if any((s * num) % den for s in self.sizes):
            raise ValueError(f"sizes {self.sizes} are not divisible by {den}")
        return Shard(self.dim, tuple(s * num // den for s in self.sizes))

    def __str__(self) -> str:
        sizes = ",".join(map(str, self.sizes))
        return f"S({self.dim};{sizes})"


Placement = Replicate | Partial | Shard

REPLICATE = Replicate()
PARTIAL = Partial()


def balanced_split(units: int, tp: int) -> tuple[int, ...]:
    """Split ``units`` whole units over ``tp`` ranks, the first ranks taking the remainder:
    6 over 4 -> 2,2,1,1."""
    base, extra = divmod(units, tp)
    return tuple(base + (1 if r < extra else 0) for r in range(tp))


def parse_placement(text: str) -> Placement:
    """Inverse of ``str(placement)``."""
    if text == "R":
        return REPLICATE
    if text == "P":
        return PARTIAL
    if text.startswith("S(") and text.endswith(")"):
        dim, sizes = text[2:-1].split(";")
        return Shard(int(dim), tuple(int(s) for s in sizes.split(",")))
    raise ValueError(f"not a placement: {text!r}")
