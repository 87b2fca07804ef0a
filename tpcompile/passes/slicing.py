"""Parameter slicing: rank r's piece of a stored tensor, from its placement.

Invariant: ``local_tensor(t, pl, r)`` has shape ``local_shape(t.shape, pl, r)``; for ``Shard`` it is the
contiguous slice at ``pl.offset(r)``; for ``Partial`` (a row-parallel bias) rank 0 holds the tensor and the
other ranks zeros, so the bias is counted once in the sum; for ``Pieces`` the local pieces, concatenated.
"""

from __future__ import annotations

import torch

from tpcompile.runtime.format.placement import Partial, Pieces, RootPlacement, Shard


def local_shape(shape: tuple[int, ...], pl: RootPlacement, rank: int) -> tuple[int, ...]:
    if isinstance(pl, Pieces):
        size = sum(pl.local_size(i, rank) for i in range(len(pl.parts)))
        return tuple(size if i == pl.dim else int(s) for i, s in enumerate(shape))
    if isinstance(pl, Shard):
        return tuple(pl.sizes[rank] if i == pl.dim else int(s) for i, s in enumerate(shape))
    return tuple(int(s) for s in shape)


def local_tensor(full: torch.Tensor, pl: RootPlacement, rank: int) -> torch.Tensor:
    if isinstance(pl, Pieces):
        parts = [local_tensor(full.narrow(pl.dim, lo, hi - lo), p, rank) for lo, hi, p in pl.parts]
        return torch.cat(parts, pl.dim)
    if isinstance(pl, Shard):
        return full.narrow(pl.dim, pl.offset(rank), pl.sizes[rank])
    if isinstance(pl, Partial) and rank != 0:
        return torch.zeros_like(full)
    return full
