"""View-like ops: a shard rides through reshapes, permutes, expands and squeezes when its slices stay
contiguous; every size literal that names the sharded dimension is rewritten per rank when lowering.

A reshape keeps ``S(d)`` on output dim ``j`` when the dims before ``j`` hold exactly the elements of the dims
before ``d`` and every rank's range along ``d`` is a whole number of output-``j`` rows. A free stored tensor
stays free through every view: its ``FreeView`` records, per view dim, which root dim it shows and at what
scale (``reshape_view_dims``), so whichever consumer splits it later splits the stored tensor.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import sympy
import torch
import torch.fx as fx

from tpcompile.passes.graph_queries import norm_dim, packet, shape_of
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import FreeView, LoweringBuilder, RuleContext, Strategy, ViewDim
from tpcompile.runtime.format.placement import REPLICATE, Partial, Replicate, Shard


def _prod(xs: Any) -> Any:
    out: Any = 1
    for x in xs:
        out = out * x
    return out


def _expr(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.sympify(x)


@functools.lru_cache(maxsize=4096)
def _is_zero(expr: sympy.Expr) -> bool:
    return bool(sympy.expand(expr) == 0)


@functools.lru_cache(maxsize=4096)
def _integer_ratio(num: sympy.Expr, den: sympy.Expr) -> int | None:
    ratio = sympy.cancel(num / den)
    return int(ratio) if ratio.is_Integer else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return _is_zero(_expr(a) - _expr(b))


def _symbolic(shape: tuple[Any, ...]) -> tuple[int | sympy.Expr, ...]:
    return tuple(s if isinstance(s, int) else _expr(s) for s in shape)


def map_shard_through_reshape(
    in_shape: tuple[Any, ...], out_shape: tuple[Any, ...], pl: Shard
) -> tuple[Shard | None, int | None]:
    """The output placement of a reshape of an ``S(d)`` tensor, or (None, unit hint) when it cannot stay.

    A size-1 output dim takes the shard only when the shard overlaps and is whole units of it: one KV head
    (``[B, T, 1 * D]`` viewed as ``[B, T, 1, D]``) replicated on every rank stays split by heads.

    Symbolic sizes are taken as their expressions, so the answer is remembered: a plan search asks the
    same question of every layer's reshapes, once per candidate plan."""
    return _map_shard(_symbolic(in_shape), _symbolic(out_shape), pl)


@functools.lru_cache(maxsize=4096)
def _map_shard(
    in_shape: tuple[int | sympy.Expr, ...], out_shape: tuple[int | sympy.Expr, ...], pl: Shard
) -> tuple[Shard | None, int | None]:
    d = pl.dim
    left = _prod(in_shape[:d])
    inner = _prod(in_shape[d + 1 :])
    for j in range(len(out_shape)):
        if not _same(_prod(out_shape[:j]), left):
            continue
        out_inner = _prod(out_shape[j + 1 :])
        if out_shape[j] == 1 and j + 1 < len(out_shape):
            ints = isinstance(inner, int) and isinstance(out_inner, int)
            values = (*pl.sizes, *(pl.starts or ()))
            if not (ints and pl.overlapping and all((v * inner) % out_inner == 0 for v in values)):
                continue
        if not (isinstance(inner, int) and isinstance(out_inner, int)):
            ratio = _integer_ratio(_expr(inner), _expr(out_inner))
            if ratio is None:
                return None, None
            return pl.with_dim(j).scaled(ratio), None
        offsets = [pl.offset(r) * inner for r in range(len(pl.sizes))]
        if all(o % out_inner == 0 for o in offsets) and all((s * inner) % out_inner == 0 for s in pl.sizes):
            return pl.with_dim(j).scaled(inner, out_inner), None
        return None, out_inner // math.gcd(inner, out_inner)
    return None, None


def reshape_view_dims(
    dims: tuple[ViewDim | None, ...], in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]
) -> tuple[ViewDim | None, ...]:
    """What each output dim of a reshape of a free view shows of the root.

    Dims are matched in groups of equal element counts; in each group only the leftmost non-1 output dim
    can carry a shard, of the leftmost non-1 input dim, scaled by the trailing elements on either side
    (``[D, H, K] -> [D, H*K]``: the merged dim shows H at scale 1/K). Everything else shows nothing."""
    out: list[ViewDim | None] = [None] * len(out_shape)
    if not all(isinstance(s, int) for s in (*in_shape, *out_shape)):
        return tuple(out)
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        gi, gj = i, j
        have, want = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while have != want:
            if have < want and i < len(in_shape):
                have, i = have * in_shape[i], i + 1
            elif j < len(out_shape):
                want, j = want * out_shape[j], j + 1
            else:
                return tuple(out)
        lead_in = next((k for k in range(gi, i) if in_shape[k] != 1), None)
        lead_out = next((k for k in range(gj, j) if out_shape[k] != 1), None)
        if lead_in is None or lead_out is None or dims[lead_in] is None:
            continue
        source = dims[lead_in]
        assert source is not None
        right_in = math.prod(in_shape[lead_in + 1 : i])
        right_out = math.prod(out_shape[lead_out + 1 : j])
        out[lead_out] = ViewDim(source.root, source.scale * Fraction(right_out, right_in))
    return tuple(out)


def _local_sizes(b: LoweringBuilder, node: fx.Node, sizes: list[Any]) -> list[Any]:
    pl = b.placement(node)
    new = list(sizes)
    if isinstance(pl, Shard) and new[pl.dim] != -1:
        new[pl.dim] = pl.sizes[b.rank]
    return new


def lower_reshape(
    b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> fx.Node:
    """The reshape with rank ``b.rank``'s size on the sharded dim."""
    return b.call(node.target, args[0], _local_sizes(b, node, args[1]), *args[2:], **kwargs)


@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)
def reshape(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Views of a Partial are Partial; a shard stays when its slices stay contiguous (see the docstring)."""
    x = node.args[0]
    p = ctx.placement(x)
    lower = {aten.flatten: None, aten.unflatten: _lower_unflatten}.get(packet(node), lower_reshape)
    if isinstance(p, FreeView):
        return Strategy({}, p.with_dims(reshape_view_dims(p.dims, shape_of(x), shape_of(node))), lower)
    if isinstance(p, Partial | Replicate):
        return Strategy({x: p}, p)
    if isinstance(p, Shard):
        out, hint = map_shard_through_reshape(shape_of(x), shape_of(node), p)
        if out is not None:
            return Strategy({x: p}, out, lower)
        if hint is not None:
            ctx.hint_unit(hint)
    return Strategy({x: REPLICATE}, REPLICATE)


def _lower_unflatten(
    b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> fx.Node:
    x, dim, sizes = args[0], args[1], list(args[2])
    pl = b.placement(node)
    start = norm_dim(dim, len(shape_of(node.args[0])))
    if isinstance(pl, Shard) and start <= pl.dim < start + len(sizes) and sizes[pl.dim - start] != -1:
        sizes[pl.dim - start] = pl.sizes[b.rank]
    return b.call(node.target, x, dim, sizes)


def _dim_map_rule(ctx: RuleContext, node: fx.Node, sources: list[int | None]) -> Strategy:
    """A view whose output dim ``i`` is input dim ``sources[i]`` (None: a new size-1 dim). Views as data:
    permute, transpose, t, unsqueeze and squeeze are each just their ``sources``."""
    x = node.args[0]
    p = ctx.placement(x)
    if isinstance(p, FreeView):
        return Strategy({}, p.with_dims(tuple(None if s is None else p.dims[s] for s in sources)))
    if isinstance(p, Shard):
        if p.dim not in sources:
            return Strategy({x: REPLICATE}, REPLICATE)
        return Strategy({x: p}, p.with_dim(sources.index(p.dim)))
    return Strategy({x: p} if p is not None else {}, p)


@register(aten.permute)
def permute(ctx: RuleContext, node: fx.Node) -> Strategy:
    nd = len(shape_of(node))
    return _dim_map_rule(ctx, node, [norm_dim(d, nd) for d in node.args[1]])


@register(aten.transpose, aten.swapaxes, aten.swapdims)
def transpose(ctx: RuleContext, node: fx.Node) -> Strategy:
    nd = len(shape_of(node))
    a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
    perm: list[int | None] = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return _dim_map_rule(ctx, node, perm)


@register(aten.t, aten.numpy_T)
def t(ctx: RuleContext, node: fx.Node) -> Strategy:
    nd = len(shape_of(node))
    return _dim_map_rule(ctx, node, list(reversed(range(nd))))


@register(aten.unsqueeze)
def unsqueeze(ctx: RuleContext, node: fx.Node) -> Strategy:
    nd = len(shape_of(node))
    dim = norm_dim(node.args[1], nd)
    sources: list[int | None] = list(range(nd - 1))
    sources.insert(dim, None)
    return _dim_map_rule(ctx, node, sources)


@register(aten.squeeze)
def squeeze(ctx: RuleContext, node: fx.Node) -> Strategy:
    in_shape = shape_of(node.args[0])
    if len(node.args) > 1:
        raw = node.args[1]
        dims = [raw] if isinstance(raw, int) else list(raw)
        removed = {norm_dim(d, len(in_shape)) for d in dims if in_shape[norm_dim(d, len(in_shape))] == 1}
    else:
        removed = {i for i, s in enumerate(in_shape) if s == 1}
    return _dim_map_rule(ctx, node, [i for i in range(len(in_shape)) if i not in removed])


@register(aten.expand)
def expand(ctx: RuleContext, node: fx.Node) -> Strategy:
    """New leading dims and broadcast size-1 dims carry nothing; a sharded dim keeps its local size."""
    x = node.args[0]
    p = ctx.placement(x)
    in_shape, out_shape = shape_of(x), shape_of(node)
    extra = len(out_shape) - len(in_shape)
    if isinstance(p, FreeView):
        dims = [None] * extra + [
            None if in_shape[i] == 1 and out_shape[i + extra] != 1 else vd for i, vd in enumerate(p.dims)
        ]
        return Strategy({}, p.with_dims(tuple(dims)), lower_reshape)
    if isinstance(p, Shard):
        return Strategy({x: p}, p.with_dim(p.dim + extra), lower_reshape)
    if isinstance(p, Partial | Replicate):
        return Strategy({x: p}, p)
    return Strategy({x: REPLICATE}, REPLICATE)


_COPIES = (aten.clone, aten.lift_fresh_copy)


@register(aten.alias, aten.detach, aten.contiguous, aten.clone, aten.lift_fresh_copy)
def identity(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Same values, same placement; a view (not a copy) of a free stored tensor stays free."""
    x = node.args[0]
    p = ctx.placement(x)
    if isinstance(p, FreeView) and packet(node) not in _COPIES:
        return Strategy({}, p)
    p = REPLICATE if isinstance(p, FreeView) or p is None else p
    return Strategy({x: p}, p)
