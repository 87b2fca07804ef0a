"""Slicing, concatenation, embedding lookups and in-place writes into buffers (KV caches).

Slices and selects along an unsharded dim keep the shard. A vocabulary-parallel embedding (weight S(0))
looks up only the ids in its range and zeroes the others: the result is Partial. A write into a buffer
gives the buffer the placement of the values written, so each rank stores only its slice of the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.graph_queries import norm_dim, packet, slice_bounds
from tpcompile.passes.ops.common import concrete, replicate_all, tensor_inputs, whole
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import (
    FreeView,
    LoweringBuilder,
    RuleContext,
    SiteKind,
    Strategy,
    shape_of,
)
from tpcompile.plan.spec import Style
from tpcompile.runtime.format.placement import PARTIAL, REPLICATE, Partial, Pieces, Placement, Shard


def _whole(node: fx.Node, dim: int) -> bool:
    """Does this slice keep the whole of ``dim``?"""
    size = shape_of(node.args[0])[dim]
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and isinstance(size, int) and end >= size)
    return bool(start in (None, 0) and full_end and step == 1)


def piece_window(ctx: RuleContext, node: fx.Node) -> tuple[int, int, int] | None:
    """The window of a slice that reads one piece of a stored tensor: every use of the tensor is such a
    slice, on the same dim, and the slices are disjoint (a fused projection's weight or bias)."""
    root = node.args[0]
    if not isinstance(root, fx.Node) or root not in ctx.names:
        return None
    windows = [slice_bounds(u) for u in root.users]
    if any(w is None or u.args[0] is not root for w, u in zip(windows, root.users, strict=True)):
        return None
    spans = sorted({w for w in windows if w is not None})
    if len({w[0] for w in spans}) != 1 or len(spans) < 2:
        return None
    if any(a[2] > b[1] for a, b in zip(spans, spans[1:], strict=False)):
        return None
    return slice_bounds(node)


def _lower_piece(b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
    """The slice of one piece, at the rank's local offset in its stored pieces."""
    layout = b.stored(node.args[0])
    window = slice_bounds(node)
    assert isinstance(layout, Pieces) and window is not None
    i = layout.index(window[1], window[2])
    lo = layout.local_offset(i, b.rank)
    return b.call(aten.slice.Tensor, args[0], layout.dim, lo, lo + layout.local_size(i, b.rank))


@register(aten.slice)
def slice_(ctx: RuleContext, node: fx.Node) -> Strategy:
    x = node.args[0]
    nd = len(shape_of(x))
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    p = ctx.placement(x)
    if isinstance(p, FreeView):
        window = piece_window(ctx, node) if p.window is None else None
        if window is not None and p.is_identity:
            return Strategy({}, FreeView(p.root, p.dims, window), _lower_piece)
        vd = p.dims[dim]
        if not _whole(node, dim) and vd is not None:
            ctx.forbid(p.root, vd.root)
        return Strategy({}, p)
    p = concrete(p)
    if isinstance(p, Shard) and p.dim == dim and not _whole(node, dim):
        return Strategy({x: REPLICATE}, REPLICATE)
    return Strategy({x: p}, p)


@register(aten.select)
def select(ctx: RuleContext, node: fx.Node) -> Strategy:
    x = node.args[0]
    nd = len(shape_of(x))
    dim = norm_dim(node.args[1], nd)
    p = ctx.placement(x)
    if isinstance(p, FreeView):
        vd = p.dims[dim]
        if vd is not None:
            ctx.forbid(p.root, vd.root)
        return Strategy({}, p.with_dims(p.dims[:dim] + p.dims[dim + 1 :]))
    p = concrete(p)
    if isinstance(p, Shard):
        if p.dim == dim:
            return Strategy({x: REPLICATE}, REPLICATE)
        return Strategy({x: p}, p.with_dim(p.dim - (1 if p.dim > dim else 0)))
    return Strategy({x: p}, p)


@register(aten.narrow)
def narrow(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``narrow(x, dim, start, length)`` (a window whose start may be known only at run time): like a
    slice that is never whole, it keeps a shard on any other dim and a free tensor stays free."""
    x = node.args[0]
    dim = norm_dim(node.args[1], len(shape_of(x)))
    p = ctx.placement(x)
    if isinstance(p, FreeView):
        vd = p.dims[dim]
        if vd is not None:
            ctx.forbid(p.root, vd.root)
        return Strategy({}, p)
    p = concrete(p)
    if isinstance(p, Shard) and p.dim == dim:
        return Strategy({x: REPLICATE}, REPLICATE)
    return Strategy({x: p}, p)


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(ctx: RuleContext, node: fx.Node) -> Strategy:
    x = node.args[0]
    nd = len(shape_of(x))
    unbind = packet(node) is aten.unbind
    dim_pos = 1 if unbind else 2
    raw = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
    dim = norm_dim(raw, nd)
    n_out = len(node.meta["val"])
    p = concrete(ctx.placement(x))
    if isinstance(p, Shard) and p.dim == dim:
        p = REPLICATE
    if isinstance(p, Shard) and unbind and p.dim > dim:
        return Strategy({x: p}, tuple(p.with_dim(p.dim - 1) for _ in range(n_out)))
    return Strategy({x: p}, tuple(p for _ in range(n_out)))


@register(aten.cat, aten.concat, aten.concatenate, aten.stack)
def cat(ctx: RuleContext, node: fx.Node) -> Strategy:
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    out_nd = len(shape_of(node))
    is_stack = packet(node) is aten.stack
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim = norm_dim(raw, out_nd)
    pls = [concrete(ctx.placement(t)) for t in tensors]
    if all(isinstance(p, Partial) for p in pls):
        return Strategy(dict(zip(tensors, pls, strict=True)), PARTIAL)
    lead = next((p for p in pls if isinstance(p, Shard)), None)
    if lead is not None:
        out_dim = lead.dim + (1 if is_stack and lead.dim >= dim else 0)
        if out_dim != dim:
            in_dim = lead.dim
            return Strategy({t: lead.with_dim(in_dim) for t in tensors}, lead.with_dim(out_dim))
    return Strategy(dict.fromkeys(tensors, REPLICATE), REPLICATE)


Lookup = Callable[[LoweringBuilder, fx.Node, Any, Any], fx.Node]


def _lower_vocab_lookup(shard: Shard, lookup: Lookup, table_ndim: int) -> Any:
    """Rank r looks up only the ids in its rows ``[start, end)`` and zeroes the others: a partial sum."""

    def lower(b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        table, ids = lookup_operands(node, args)
        start = shard.offset(b.rank)
        end = start + shard.sizes[b.rank]
        below = b.call(aten.lt.Scalar, ids, start)
        above = b.call(aten.ge.Scalar, ids, end)
        miss = b.call(aten.bitwise_or.Tensor, below, above)
        local = b.call(aten.sub.Tensor, ids, start)
        local = b.call(aten.masked_fill.Scalar, local, miss, 0)
        rows = lookup(b, node, table, local)
        for _ in range(table_ndim - 1):
            miss = b.call(aten.unsqueeze.default, miss, -1)
        return b.call(aten.masked_fill.Scalar, rows, miss, 0.0)

    return lower


def lookup_operands(node: fx.Node, args: tuple[Any, ...] | None = None) -> tuple[Any, Any]:
    """(table, ids) of a lookup node (``embedding(table, ids)``, ``index(table, [ids])``,
    ``index_select(table, 0, ids)``), from ``args`` when given (the lowered ones) or the node's own."""
    a: Any = node.args if args is None else args
    if packet(node) is aten.embedding:
        return a[0], a[1]
    if packet(node) is aten.index:
        return a[0], a[1][0]
    return a[0], a[2]


def _embedding_lookup(b: LoweringBuilder, node: fx.Node, table: Any, ids: Any) -> fx.Node:
    return b.call(aten.embedding.default, table, ids, *node.args[2:], **node.kwargs)


def _index_lookup(b: LoweringBuilder, node: fx.Node, table: Any, ids: Any) -> fx.Node:
    return b.call(aten.index.Tensor, table, [ids])


def _index_select_lookup(b: LoweringBuilder, node: fx.Node, table: Any, ids: Any) -> fx.Node:
    return b.call(aten.index_select.default, table, 0, ids)


_ROW_ROLES = {Style.VOCAB: 0, Style.COLWISE: 0, Style.ROWWISE: 0}


def _lookup_rows(ctx: RuleContext, node: fx.Node, lookup: Lookup) -> Strategy:
    """A table read by rows: ``out = table[ids]`` with ``ids`` of any shape, rows of ``table`` on dim 0.

    Rows split (vocabulary-parallel): each rank looks up its rows, a partial sum. A table split on a later
    dim: the output is split on the same feature dim. Ids split on a dim: the output is split there."""
    table, ids = lookup_operands(node)
    raw = ctx.placement(table)
    pi = whole(concrete(ctx.placement(ids)))
    ctx.offer_site(raw, ids, 0, SiteKind.LOOKUP)
    pw = (ctx.planned(raw, _ROW_ROLES) if isinstance(pi, type(REPLICATE)) else None) or concrete(raw)
    pw = whole(pw)
    out_nd = len(shape_of(node))
    table_nd = len(shape_of(table))
    styles = {table: Style.VOCAB} if isinstance(raw, FreeView) else {}
    if isinstance(pw, Shard) and pw.dim == 0 and not pw.overlapping and not isinstance(pi, Shard):
        return Strategy({table: pw, ids: pi}, PARTIAL, _lower_vocab_lookup(pw, lookup, table_nd), styles)
    if isinstance(pw, Shard) and pw.dim > 0 and not isinstance(pi, Shard):
        return Strategy({table: pw, ids: pi}, pw.with_dim(out_nd - table_nd + pw.dim))
    if isinstance(pi, Shard):
        return Strategy({table: REPLICATE, ids: pi}, pi)
    return Strategy({table: REPLICATE, ids: REPLICATE}, REPLICATE)


@register(aten.embedding)
def embedding(ctx: RuleContext, node: fx.Node) -> Strategy:
    return _lookup_rows(ctx, node, _embedding_lookup)


@register(aten.index)
def index(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``x[idx]`` with one index tensor on dim 0 is a row lookup; other advanced indexing is replicated."""
    indices: Any = node.args[1]
    ids = indices[0] if len(indices) == 1 else None
    if ctx.is_tensor(ids) and ids.meta["val"].dtype in _ID_DTYPES:
        return _lookup_rows(ctx, node, _index_lookup)
    return replicate_all(ctx, node)


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@register(aten.index_select)
def index_select(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``index_select(x, 0, idx)`` is a row lookup; on a later dim a shard elsewhere is kept."""
    x, dim, index = node.args[:3]
    dim = norm_dim(dim, len(shape_of(x)))
    if dim == 0:
        return _lookup_rows(ctx, node, _index_select_lookup)
    p = whole(concrete(ctx.placement(x)))
    if isinstance(p, Shard) and p.dim != dim:
        return Strategy({x: p, index: REPLICATE}, p)
    return Strategy({x: REPLICATE, index: REPLICATE}, REPLICATE)


def _write_into(ctx: RuleContext, node: fx.Node, dst: fx.Node, src: fx.Node, blocked: set[int]) -> Strategy:
    """In-place write of ``src`` into ``dst`` (same dims): a free destination takes the source's shard."""
    pd, ps = ctx.placement(dst), concrete(ctx.placement(src))
    if isinstance(ps, Partial):
        ps = REPLICATE
    if isinstance(ps, Shard) and ps.dim in blocked:
        ps = REPLICATE
    want: Placement
    if isinstance(pd, FreeView):
        want = ps if not (isinstance(ps, Shard) and not ctx.shardable(pd, ps.dim)) else REPLICATE
    else:
        # the destination keeps its placement (converting it would write into a copy); a Partial one
        # takes the source as a partial too (on rank 0), which is linear and so correct
        want = concrete(pd)
        if isinstance(want, Shard) and want.dim in blocked:
            ctx.refuse(f"cannot write in place at global indices of dim {want.dim}, which is sharded")
    others = {a: REPLICATE for a in tensor_inputs(ctx, node) if a not in (dst, src)}
    return Strategy({**others, dst: want, src: want}, want)


@register(aten.copy_, aten.copy)
def copy(ctx: RuleContext, node: fx.Node) -> Strategy:
    return _write_into(ctx, node, node.args[0], node.args[1], set())


@register(aten.index_copy_, aten.index_copy)
def index_copy(ctx: RuleContext, node: fx.Node) -> Strategy:
    dst, dim, _, src = node.args[:4]
    return _write_into(ctx, node, dst, src, {norm_dim(dim, len(shape_of(dst)))})


@register(aten.scatter_, aten.scatter)
def scatter(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``dst.scatter_(dim, index, src)`` with an index of ``src``'s shape (a KV cache written at each row's
    own positions): a write like ``index_copy_``, and each index element goes with its ``src`` element, so
    the index is split like the values (an index broadcast over KV heads is sliced to the rank's heads)."""
    dst, dim, index = node.args[:3]
    src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src")
    if not (isinstance(src, fx.Node) and isinstance(index, fx.Node) and ctx.is_tensor(src)):
        return replicate_all(ctx, node)
    if shape_of(index) != shape_of(src):
        return replicate_all(ctx, node)
    strategy = _write_into(ctx, node, dst, src, {norm_dim(dim, len(shape_of(dst)))})
    strategy.demands[index] = strategy.demands[src]
    return strategy


@register(aten.index_put_, aten.index_put)
def index_put(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``dst[indices] = values`` with one advanced index: dims map one to one when values has dst's rank."""
    dst, indices, values = node.args[:3]
    used = [i for i, ix in enumerate(indices) if ix is not None]
    vshape = shape_of(values) if isinstance(values, fx.Node) else ()
    if len(used) == 1 and len(vshape) == len(shape_of(dst)):
        return _write_into(ctx, node, dst, values, set(used))
    return replicate_all(ctx, node)
