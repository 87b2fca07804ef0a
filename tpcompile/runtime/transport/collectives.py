"""Collectives the runtime itself issues, outside the compiled programs.

Invariant: every function here is collective: all ranks of ``group`` call it
in the same order with tensors of the same rank-independent metadata (dtype,
number of dims), and all of them get the same result back.  With a single
rank (or no initialised process group) they are local no-ops.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from ..errors import CollectiveError
from ..format import Placement, Shard
from .shm import ShmCommunicator

__all__ = [
    "all_gather_small",
    "broadcast_object",
    "broadcast_tokens",
    "collective_clock",
    "gather_outputs",
    "gather_sharded",
    "use_shared_memory",
    "world_size",
]

_SHARED: ShmCommunicator | None = None  # same-host transport for the default group, when set up
_BROADCASTS = itertools.count()  # numbers the store keys of broadcast_object (same order on every rank)
_NO_DEADLINE = timedelta(days=365)


def use_shared_memory(comm: ShmCommunicator | None) -> None:
    """Route small collectives on the default group through ``comm`` (None: back to torch.distributed)."""
    global _SHARED
    _SHARED = comm


def collective_clock() -> tuple[float, int] | None:
    """(seconds spent in collectives, calls) of the same-host transport so far, or None when the ranks do
    not use it (their collectives then show only in a profiler)."""
    return None if _SHARED is None else (_SHARED.seconds, _SHARED.calls)


def all_gather_small(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in rank order."""
    if _SHARED is not None and group in (None, dist.group.WORLD) and _SHARED.fits(t):
        return list(_SHARED.all_gather(t.unsqueeze(0)).unbind(0))
    parts = [torch.empty_like(t) for _ in range(world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def gather_sharded(
    local: torch.Tensor, placement: Placement, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Reassemble the global tensor from every rank's slice along ``placement.dim``.

    Slices may be uneven: each rank pads its slice to the largest size, the
    padded slices are all-gathered, and each is trimmed back to its own size
    before concatenation.  Any other placement than a (non-overlapping)
    :class:`Shard` returns ``local`` unchanged.
    """
    if not isinstance(placement, Shard) or placement.overlapping:
        return local
    if world_size(group) == 1:
        return local
    dim = placement.dim % local.dim()
    moved = local.movedim(dim, 0)
    pad = max(placement.sizes) - moved.shape[0]
    if pad:
        moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))])
    moved = moved.contiguous()
    parts = [torch.empty_like(moved) for _ in placement.sizes]
    dist.all_gather(parts, moved, group=group)
    trimmed = [part[:size] for part, size in zip(parts, placement.sizes, strict=True)]
    return torch.cat(trimmed).movedim(0, dim)


def gather_outputs(
    outputs: Sequence[torch.Tensor], placements: Sequence[Placement], group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """:func:`gather_sharded` for each output (replicated ones pass through)."""
    return [gather_sharded(t, p, group) for t, p in zip(outputs, placements, strict=True)]


def broadcast_tokens(tokens: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> list[int]:
    """Return the int64 ``tokens`` (1-d) of rank ``src`` (group-relative) on every rank, as a list."""
    if world_size(group) == 1:
        return [int(t) for t in tokens.tolist()]
    buf = tokens.contiguous()
    dist.broadcast(buf, group=group, group_src=src)
    return [int(t) for t in buf.tolist()]


def broadcast_object(obj: object, src: int = 0, group: dist.ProcessGroup | None = None) -> object:
    """Return the JSON-serialisable ``obj`` of rank ``src`` (group-relative) on every rank.

    On the default group the value travels through the rendezvous store and the receivers wait without
    the collective timeout, since the source may be waiting for a person (rank 0 reading stdin); they
    fail with :class:`CollectiveError` as soon as the store (rank 0) is gone.
    """
    if world_size(group) == 1:
        return obj
    if group not in (None, dist.group.WORLD):
        box = [obj]
        dist.broadcast_object_list(box, group=group, group_src=src)
        return box[0]
    store = distributed_c10d._get_default_store()
    key = f"tpcompile/broadcast/{next(_BROADCASTS)}"
    if dist.get_rank() == src:
        text = json.dumps(obj)
        store.set(key, text)
        return json.loads(text)
    try:
        store.wait([key], _NO_DEADLINE)
        raw = store.get(key)
    except dist.DistError as exc:
        raise CollectiveError(f"rank {src} exited while the other ranks waited for its next input") from exc
    return json.loads(raw.decode("utf-8"))
