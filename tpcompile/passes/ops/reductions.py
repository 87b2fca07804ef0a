"""Reductions, softmax and normalisations.

Over a dim that is not sharded, a shard stays (renumbered when the dim disappears). ``sum`` over the
sharded dim gives a Partial; ``mean`` too, divided by the *global* count. Anything nonlinear over the
sharded dim (max, softmax, var, layer/rms norm) needs the whole dim, and a Partial is reduced first.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from tpcompile.passes.graph_queries import norm_dim, packet, shape_of
from tpcompile.passes.ops.common import concrete, replicate_all
from tpcompile.passes.ops.pointwise import Linearity, pointwise_strategy
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import LoweringBuilder, RuleContext, Strategy
from tpcompile.runtime.format.placement import PARTIAL, REPLICATE, Partial, Placement, Shard


def _reduced_dims(node: fx.Node, nd: int) -> tuple[list[int], bool]:
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if dims is None or dims == []:
        return list(range(nd)), keepdim
    if isinstance(dims, int):
        dims = [dims]
    return [norm_dim(d, nd) for d in dims], keepdim


def _kept(pl: Shard, dims: list[int], keepdim: bool) -> Shard:
    return pl if keepdim else pl.with_dim(pl.dim - sum(1 for d in dims if d < pl.dim))


def _lower_global_mean(global_count: int) -> Any:
    def lower(b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        nd = len(shape_of(node.args[0]))
        dims, keepdim = _reduced_dims(node, nd)
        total = b.call(aten.sum.dim_IntList, args[0], dims, keepdim, **kwargs)
        return b.call(aten.div.Tensor, total, global_count)

    return lower


def _reduction(linear: bool) -> Any:
    def rule(ctx: RuleContext, node: fx.Node) -> Strategy:
        x = node.args[0]
        shape = shape_of(x)
        p = concrete(ctx.placement(x))
        dims, keepdim = _reduced_dims(node, len(shape))
        if isinstance(p, Partial):
            return Strategy({x: p}, PARTIAL) if linear else Strategy({x: REPLICATE}, REPLICATE)
        if isinstance(p, Shard):
            if p.dim not in dims:
                return Strategy({x: p}, _kept(p, dims, keepdim))
            if linear:
                lower = None
                if packet(node) is aten.mean:
                    count = 1
                    for d in dims:
                        count *= int(shape[d])
                    lower = _lower_global_mean(count)
                return Strategy({x: p}, PARTIAL, lower)
        return Strategy({x: REPLICATE}, REPLICATE)

    return rule


register(aten.sum, aten.mean)(_reduction(linear=True))
register(
    aten.amax,
    aten.amin,
    aten.argmax,
    aten.argmin,
    aten.prod,
    aten.any,
    aten.all,
    aten.logsumexp,
    aten.var,
    aten.std,
    aten.norm,
    aten.linalg_vector_norm,
    aten.var_mean,
)(_reduction(linear=False))


@register(aten.max, aten.min)
def max_min(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``max(x, dim)`` returns (values, indices); ``max(x)`` and ``max(x, y)`` are handled as reductions."""
    if len(node.args) > 1 and isinstance(node.args[1], int):
        s = _reduction(linear=False)(ctx, node)
        return Strategy(s.demands, (s.out, s.out) if not isinstance(s.out, tuple) else s.out)
    if len(node.args) > 1:
        return pointwise_strategy(ctx, node, Linearity.NONE)
    return _reduction(linear=False)(ctx, node)


def _softmax_like(ctx: RuleContext, node: fx.Node) -> Strategy:
    x = node.args[0]
    p = concrete(ctx.placement(x))
    dim = norm_dim(node.args[1], len(shape_of(x)))
    if isinstance(p, Shard) and p.dim != dim:
        return Strategy({x: p}, p)
    return Strategy({x: REPLICATE}, REPLICATE)


register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum)(_softmax_like)


def _norm(ctx: RuleContext, node: fx.Node, normalized: int, params: list[Any], n_outputs: int) -> Strategy:
    x = node.args[0]
    nd = len(shape_of(x))
    p = concrete(ctx.placement(x))
    keep = isinstance(p, Shard) and p.dim < nd - normalized
    xp: Placement = p if keep else REPLICATE
    demands: dict[fx.Node, Placement] = {x: xp}
    for w in params:
        if isinstance(w, fx.Node):
            demands[w] = REPLICATE
    if n_outputs == 1:
        return Strategy(demands, xp)
    return Strategy(demands, tuple(xp for _ in range(n_outputs)))


@register(aten.layer_norm)
def layer_norm(ctx: RuleContext, node: fx.Node) -> Strategy:
    args = list(node.args) + [None] * 4
    return _norm(
        ctx, node, len(args[1]), [args[2], args[3], node.kwargs.get("weight"), node.kwargs.get("bias")], 1
    )


@register(aten.native_layer_norm)
def native_layer_norm(ctx: RuleContext, node: fx.Node) -> Strategy:
    return _norm(ctx, node, len(node.args[1]), [node.args[2], node.args[3]], 3)


@register(aten.rms_norm, aten._fused_rms_norm)
def rms_norm(ctx: RuleContext, node: fx.Node) -> Strategy:
    args = list(node.args) + [None] * 3
    n_out = 2 if packet(node) is aten._fused_rms_norm else 1
    return _norm(ctx, node, len(args[1]), [args[2], node.kwargs.get("weight")], n_out)


@register(aten.group_norm, aten.native_group_norm, aten.batch_norm, aten._native_batch_norm_legit_no_training)
def channel_norms(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Normalisations over channels: everything replicated (correct; rarely on a TP critical path)."""
    return replicate_all(ctx, node)
