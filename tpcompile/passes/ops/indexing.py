"""Slicing, concatenation, embedding lookups and in-place writes into buffers (KV caches).

Slices and selects along an unsharded dim keep the shard. A vocabulary-parallel embedding (weight S(0))
looks up only the ids in its range and zeroes the others: the result is Partial. A write into a buffer
gives the buffer the placement of the values written, so each rank stores only its slice of the cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.ops import register
from tpcompile.passes.ops.common import aten, concrete, norm_dim, tensor_inputs
from tpcompile.passes.placement import PARTIAL, REPLICATE, Partial, Pieces, Placement, Shard
from tpcompile.passes.propagate import FreeView, RuleContext, Strategy, shape_of


def _whole(node: fx.Node, dim: int) -> bool:
    """Does this slice keep the whole of ``dim``?"""
    size = shape_of(node.args[0])[dim]
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and isinstance(size, int) and end >= size)
    return bool(start in (None, 0) and full_end and step == 1)


def slice_bounds(node: Any) -> tuple[int, int, int] | None:
    """(dim, lo, hi) of a step-1 ``aten.slice`` with constant bounds (clipped to the size), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target != aten.slice.Tensor:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    shape = shape_of(args[0])
    raw_dim, lo, hi, step = args[1] if args[1] is not None else 0, args[2] or 0, args[3], args[4] or 1
    if not isinstance(raw_dim, int):
        return None
    dim = norm_dim(raw_dim, len(shape))
    size = shape[dim]
    hi = size if hi is None else hi
    if step != 1 or not (isinstance(size, int) and isinstance(lo, int) and isinstance(hi, int)):
        return None
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    return (dim, lo, hi) if lo < hi else None


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


def _lower_piece(b: Any, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
    """The slice of one piece, at the rank's local offset in its stored pieces."""
    layout = b.prop.roots[node.args[0]]
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
        if window is not None and p.dims == tuple(range(nd)):
            return Strategy({}, FreeView(p.root, p.dims, window), _lower_piece)
        if not _whole(node, dim) and p.dims[dim] is not None:
            ctx.forbid(p.root, p.dims[dim])
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
        if p.dims[dim] is not None:
            ctx.forbid(p.root, p.dims[dim])
        return Strategy({}, p.with_dims(p.dims[:dim] + p.dims[dim + 1 :]))
    p = concrete(p)
    if isinstance(p, Shard):
        if p.dim == dim:
            return Strategy({x: REPLICATE}, REPLICATE)
        return Strategy({x: p}, p.with_dim(p.dim - (1 if p.dim > dim else 0)))
    return Strategy({x: p}, p)


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(ctx: RuleContext, node: fx.Node) -> Strategy:
    x = node.args[0]
    nd = len(shape_of(x))
    default = 0
    dim_pos = 1 if "unbind" in str(node.target) else 2
    raw = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", default)
    dim = norm_dim(raw, nd)
    n_out = len(node.meta["val"])
    p = concrete(ctx.placement(x))
    if isinstance(p, Shard) and p.dim == dim:
        p = REPLICATE
    if isinstance(p, Shard) and "unbind" in str(node.target) and p.dim > dim:
        return Strategy({x: p}, tuple(p.with_dim(p.dim - 1) for _ in range(n_out)))
    return Strategy({x: p}, tuple(p for _ in range(n_out)))


@register(aten.cat, aten.concat, aten.concatenate, aten.stack)
def cat(ctx: RuleContext, node: fx.Node) -> Strategy:
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    out_nd = len(shape_of(node))
    is_stack = "stack" in str(node.target)
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


def _lower_vocab_embedding(shard: Shard) -> Any:
    def lower(b: Any, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        weight, ids = args[0], args[1]
        start = shard.offset(b.rank)
        end = start + shard.sizes[b.rank]
        below = b.call(aten.lt.Scalar, ids, start)
        above = b.call(aten.ge.Scalar, ids, end)
        miss = b.call(aten.bitwise_or.Tensor, below, above)
        local = b.call(aten.sub.Tensor, ids, start)
        local = b.call(aten.masked_fill.Scalar, local, miss, 0)
        rows = b.call(aten.embedding.default, weight, local, *args[2:], **kwargs)
        mask = b.call(aten.unsqueeze.default, miss, -1)
        return b.call(aten.masked_fill.Scalar, rows, mask, 0.0)

    return lower


@register(aten.embedding)
def embedding(ctx: RuleContext, node: fx.Node) -> Strategy:
    weight, ids = node.args[0], node.args[1]
    pw = ctx.placement(weight)
    pi = concrete(ctx.placement(ids))
    if isinstance(pi, Partial):
        pi = REPLICATE
    vocab = shape_of(weight)[0]
    if isinstance(pw, FreeView):
        decision = ctx.decision(pw)
        if (
            decision is not None
            and decision.style in ("colwise", "rowwise")
            and decision.starts is None
            and isinstance(pi, type(REPLICATE))
        ):
            from tpcompile.passes.placement import balanced_split

            pw = Shard(0, decision.sizes or balanced_split(vocab, ctx.tp))
        else:
            pw = REPLICATE
    if isinstance(pw, Shard) and pw.dim == 0 and not pw.overlapping and not isinstance(pi, Shard):
        return Strategy({weight: pw, ids: pi}, PARTIAL, _lower_vocab_embedding(pw))
    if isinstance(pw, Shard) and pw.dim == 1 and not isinstance(pi, Shard):
        return Strategy({weight: pw, ids: pi}, pw.with_dim(len(shape_of(node)) - 1))
    return Strategy({weight: REPLICATE, ids: pi}, pi if isinstance(pi, Shard) else REPLICATE)


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


@register(aten.index_put_, aten.index_put)
def index_put(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``dst[indices] = values`` with one advanced index: dims map one to one when values has dst's rank."""
    dst, indices, values = node.args[:3]
    used = [i for i, ix in enumerate(indices) if ix is not None]
    vshape = shape_of(values) if isinstance(values, fx.Node) else ()
    if len(used) == 1 and len(vshape) == len(shape_of(dst)):
        return _write_into(ctx, node, dst, values, set(used))
    from tpcompile.passes.ops.common import replicate_all

    return replicate_all(ctx, node)


@register(aten.index_select)
def index_select(ctx: RuleContext, node: fx.Node) -> Strategy:
    x, dim, index = node.args[:3]
    dim = norm_dim(dim, len(shape_of(x)))
    p = concrete(ctx.placement(x))
    if isinstance(p, Shard) and p.dim != dim:
        return Strategy({x: p, index: REPLICATE}, p)
    return Strategy({x: REPLICATE, index: REPLICATE}, REPLICATE)


def is_tensor_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, torch.Tensor) for v in value)
