"""Redistribution: a pure function from (source placement, target placement) to the ops that convert one
into the other on one rank, emitted with ``torch.ops._c10d_functional`` collectives on a named group.

Invariant: the emitted ops, run on every rank, turn each rank's local value of ``src`` into its local
value of ``dst``; P -> R is one all-reduce, S -> R one all-gather (padded to the largest shard, then
trimmed), R -> S a local slice, R -> P keeps the value on rank 0 and zeros elsewhere. The group name
is a placeholder that the runtime resolves to its process group.

Compressed all-reduces (``--comm-dtype``, ``Emitter.comm_dtype``): a floating value wider than the comm
dtype is cast to it, all-reduced (the runtime's transports add 16-bit payloads in float32 and round once,
``runtime/transport/rank_sum.py``) and cast back, in the graph itself, so every execution path (eager,
``--compile``, native) sends the narrow payload; all-gathers always send the value as it is.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed._functional_collectives  # noqa: F401  (registers the ops' fake kernels)
import torch.fx as fx

from tpcompile.runtime.format.placement import Partial, Placement, Replicate, Shard

GROUP_NAME = "tp"
aten = torch.ops.aten
c10d = torch.ops._c10d_functional


class Emitter(Protocol):
    rank: int
    tp: int
    comm_dtype: torch.dtype | None  # all-reduce payloads wider than this cross in it (None: as they are)

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node: ...


def wire_dtype(payload: torch.dtype, comm: torch.dtype | None) -> torch.dtype | None:
    """The dtype an all-reduce of a ``payload`` value crosses in under comm dtype ``comm``, when it is cast
    (a floating payload wider than ``comm``), else None."""
    if comm is None or not payload.is_floating_point or payload.itemsize <= comm.itemsize:
        return None
    return comm


def all_reduce(b: Emitter, value: fx.Node, dtype: torch.dtype | None = None) -> fx.Node:
    """The sum over ranks of ``value`` (of ``dtype``: cast to ``b.comm_dtype`` around the reduction when
    :func:`wire_dtype` says so)."""
    wire = wire_dtype(dtype, b.comm_dtype) if dtype is not None else None
    payload = value if wire is None else b.call(aten._to_copy.default, value, dtype=wire)
    summed = b.call(c10d.wait_tensor.default, b.call(c10d.all_reduce.default, payload, "sum", GROUP_NAME))
    return summed if wire is None else b.call(aten._to_copy.default, summed, dtype=dtype)


def all_gather(b: Emitter, value: fx.Node, pl: Shard, ndim: int) -> fx.Node:
    """Concatenate every rank's shard along ``pl.dim``; uneven shards are padded to the largest, then
    trimmed."""
    x = value if pl.dim == 0 else b.call(aten.transpose.int, value, 0, pl.dim)
    biggest = max(pl.sizes)
    mine = pl.sizes[b.rank]
    if mine < biggest:
        x = b.call(aten.constant_pad_nd.default, x, [0, 0] * (ndim - 1) + [0, biggest - mine], 0.0)
    x = b.call(aten.contiguous.default, x)
    gathered = b.call(
        c10d.wait_tensor.default, b.call(c10d.all_gather_into_tensor.default, x, b.tp, GROUP_NAME)
    )
    if not pl.even:
        pieces = [
            b.call(aten.slice.Tensor, gathered, 0, r * biggest + lo, r * biggest + hi)
            for r, (lo, hi) in enumerate(_owned_ranges(pl))
            if hi > lo
        ]
        gathered = b.call(aten.cat.default, pieces, 0)
    return gathered if pl.dim == 0 else b.call(aten.transpose.int, gathered, 0, pl.dim)


def _owned_ranges(pl: Shard) -> list[tuple[int, int]]:
    """For each rank, the part of its slice (local coordinates) that no lower rank already holds; in rank
    order these parts tile the dimension (overlapping slices must still start in non-decreasing order)."""
    ranges, covered = [], 0
    for r, size in enumerate(pl.sizes):
        start = pl.offset(r)
        if start > covered:
            raise AssertionError(f"shard {pl} leaves [{covered}, {start}) on no rank")
        lo = min(size, covered - start)
        ranges.append((lo, size))
        covered = max(covered, start + size)
    return ranges


def local_slice(b: Emitter, value: fx.Node, pl: Shard) -> fx.Node:
    start = pl.offset(b.rank)
    return b.call(aten.slice.Tensor, value, pl.dim, start, start + pl.sizes[b.rank])


def redistribute(
    b: Emitter, value: fx.Node, src: Placement, dst: Placement, ndim: int, dtype: torch.dtype | None = None
) -> fx.Node:
    """Emit the conversion of ``value`` (of ``dtype``, when known) from ``src`` to ``dst`` on rank
    ``b.rank``."""
    if src == dst:
        return value
    if isinstance(src, Partial):
        whole = all_reduce(b, value, dtype)
        return whole if isinstance(dst, Replicate) else redistribute(b, whole, Replicate(), dst, ndim)
    if isinstance(src, Shard):
        whole = all_gather(b, value, src, ndim)
        return whole if isinstance(dst, Replicate) else redistribute(b, whole, Replicate(), dst, ndim)
    if isinstance(dst, Shard):
        return local_slice(b, value, dst)
    if isinstance(dst, Partial):
        return value if b.rank == 0 else b.call(aten.mul.Tensor, value, 0)
    raise AssertionError(f"no redistribution from {src} to {dst}")
