"""Matrix products: ``linear``, ``mm``, ``addmm``, ``bmm``, ``matmul``.

Megatron's two layouts fall out of one rule for ``A[..., m, k] @ B[..., k, n]``:
column-parallel (A R, B S(n)) -> S(n); row-parallel (A S(k), B S(k)) -> P. A weight still free is split the
way its activation asks (the plan says which linears start a column-parallel chain), a row-parallel bias is
stored on rank 0 only (Partial), so it is added once. Batch dims shard like elementwise ops.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.ops import register
from tpcompile.passes.ops.common import aten, concrete
from tpcompile.passes.ops.experts import stacked_weight_placement
from tpcompile.passes.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Placement,
    Replicate,
    Shard,
    balanced_split,
)
from tpcompile.passes.propagate import FreeView, RuleContext, Strategy, shape_of


def _col_split(
    ctx: RuleContext, weight_pl: FreeView | Placement | None, features: int
) -> Shard | None:
    """The column split (on dim 0) when the plan makes this free weight column-parallel, else None."""
    decision = ctx.decision(weight_pl) if isinstance(weight_pl, FreeView) else None
    if decision is None or decision.style != "colwise":
        return None
    return Shard(0, decision.sizes or balanced_split(features, ctx.tp), decision.starts)


def _forced_row(ctx: RuleContext, weight_pl: FreeView | Placement | None) -> bool:
    decision = ctx.decision(weight_pl) if isinstance(weight_pl, FreeView) else None
    return decision is not None and decision.style == "rowwise"


def _forced_replicate(ctx: RuleContext, weight_pl: FreeView | Placement | None) -> bool:
    decision = ctx.decision(weight_pl) if isinstance(weight_pl, FreeView) else None
    return decision is not None and decision.style == "replicate"


def matmul_strategy(
    ctx: RuleContext, node: fx.Node, a: fx.Node, b: fx.Node, bias: fx.Node | None = None
) -> Strategy:
    """``a[..., m, k] @ b[..., k, n]`` (+ bias broadcast over the output)."""
    sa, sb = shape_of(a), shape_of(b)
    if len(sa) < 2 or len(sb) < 2:
        ins = [x for x in (a, b, bias) if x is not None]
        return Strategy(dict.fromkeys(ins, REPLICATE), REPLICATE)
    out_nd = len(shape_of(node))
    pa_raw, pb_raw = ctx.placement(a), ctx.placement(b)
    pa, pb = concrete(pa_raw), concrete(pb_raw)
    if isinstance(pa, Partial):
        pa = REPLICATE
    if isinstance(pb, Partial):
        pb = REPLICATE
    stacked = stacked_weight_placement(ctx, pa, pb_raw, sb)  # planned expert weights (ops/experts.py)
    if stacked is not None:
        pb = stacked
    ka, mb_k, nb = len(sa) - 1, len(sb) - 2, len(sb) - 1
    # a contraction over an overlapping shard would count the shared part twice
    if isinstance(pa, Shard) and pa.overlapping and pa.dim == ka:
        pa = REPLICATE
    if isinstance(pb, Shard) and pb.overlapping and pb.dim == mb_k:
        pb = REPLICATE
    demands: dict[fx.Node, Placement] = {}
    out: Placement

    if isinstance(pa, Shard) and pa.dim == ka:  # contraction dim sharded: row-parallel
        demands = {a: pa, b: pa.with_dim(mb_k)}
        if _forced_replicate(ctx, pb_raw) or (isinstance(pb, Shard) and pb.dim != mb_k):
            demands = {a: REPLICATE, b: pb}
            out = pb.with_dim(out_nd - 1) if isinstance(pb, Shard) and pb.dim == nb else REPLICATE
        else:
            out = PARTIAL
    elif isinstance(pa, Replicate) and isinstance(pb, Shard) and pb.dim == mb_k:
        demands = {a: pb.with_dim(ka), b: pb}
        out = PARTIAL
    elif isinstance(pa, Replicate) and isinstance(pb, Shard) and pb.dim == nb:
        demands, out = {a: pa, b: pb}, pb.with_dim(out_nd - 1)
    elif isinstance(pa, Replicate) and isinstance(pb_raw, FreeView) and len(sb) == 2:
        split = _col_split(ctx, pb_raw, sb[nb])
        if split is not None:
            demands, out = {a: pa, b: split.with_dim(nb)}, split.with_dim(out_nd - 1)
        elif _forced_row(ctx, pb_raw):
            sizes = balanced_split(sb[mb_k], ctx.tp)
            demands, out = {a: Shard(ka, sizes), b: Shard(mb_k, sizes)}, PARTIAL
        else:
            demands, out = {a: pa, b: REPLICATE}, REPLICATE
    elif isinstance(pa, Shard) and pa.dim == ka - 1:  # rows of a sharded (sequence / m)
        demands, out = {a: pa, b: REPLICATE}, pa.with_dim(out_nd - 2)
    elif isinstance(pa, Shard) or isinstance(pb, Shard):  # a batch dim
        demands, out = _batch_strategy(a, b, pa, pb, out_nd)
    else:
        demands, out = {a: pa, b: pb}, REPLICATE

    if bias is not None:
        demands[bias] = _bias_demand(out, shape_of(bias), out_nd)
    return Strategy(demands, out)


def _batch_strategy(
    a: fx.Node, b: fx.Node, pa: Placement, pb: Placement, out_nd: int
) -> tuple[dict[fx.Node, Placement], Placement]:
    sa = shape_of(a)
    lead, other = (a, b) if isinstance(pa, Shard) and pa.dim < len(sa) - 2 else (b, a)
    pl = pa if lead is a else pb
    assert isinstance(pl, Shard)
    s_lead, s_other = shape_of(lead), shape_of(other)
    if pl.dim >= len(s_lead) - 2:
        return {a: REPLICATE, b: REPLICATE}, REPLICATE
    out_dim = pl.dim + out_nd - len(s_lead)
    od = out_dim - (out_nd - len(s_other))
    want: Placement = REPLICATE if od < 0 or s_other[od] == 1 else pl.with_dim(od)
    return {lead: pl, other: want}, pl.with_dim(out_dim)


def _bias_demand(out: Placement, bias_shape: tuple[int, ...], out_nd: int) -> Placement:
    if isinstance(out, Partial):
        return PARTIAL
    if isinstance(out, Shard):
        d = out.dim - (out_nd - len(bias_shape))
        if d >= 0 and bias_shape[d] != 1:
            return out.with_dim(d)
    return REPLICATE


@register(aten.linear)
def linear(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``x @ W.T + b`` with ``W[out, in]``: the weight is seen through a transpose."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    pw = ctx.placement(w)
    sw = shape_of(w)
    px = concrete(ctx.placement(x))
    nd = len(shape_of(node))
    if isinstance(px, Partial) or (isinstance(px, Shard) and px.overlapping and px.dim == nd - 1):
        px = REPLICATE
    demands: dict[fx.Node, Placement]
    out: Placement
    if isinstance(px, Shard) and px.dim == nd - 1:
        if _forced_replicate(ctx, pw) or (isinstance(pw, Shard) and pw.dim == 0):
            return _linear_replicated(x, w, bias)
        demands, out = {x: px, w: px.with_dim(1)}, PARTIAL
    elif isinstance(px, Shard):
        demands, out = {x: px, w: REPLICATE}, px.with_dim(px.dim)
    elif isinstance(pw, FreeView):
        split = _col_split(ctx, pw, sw[0])
        if split is not None:
            demands, out = {x: px, w: split}, split.with_dim(nd - 1)
        elif _forced_row(ctx, pw):
            sizes = balanced_split(sw[1], ctx.tp)
            demands, out = {x: Shard(nd - 1, sizes), w: Shard(1, sizes)}, PARTIAL
        else:
            return _linear_replicated(x, w, bias)
    elif isinstance(pw, Shard) and pw.dim == 0:
        demands, out = {x: px, w: pw}, pw.with_dim(nd - 1)
    elif isinstance(pw, Shard) and pw.dim == 1:
        demands, out = {x: pw.with_dim(nd - 1), w: pw}, PARTIAL
    else:
        return _linear_replicated(x, w, bias)
    if isinstance(bias, fx.Node):
        demands[bias] = _bias_demand(out, shape_of(bias), nd)
    return Strategy(demands, out)


def _linear_replicated(x: fx.Node, w: fx.Node, bias: object) -> Strategy:
    demands: dict[fx.Node, Placement] = {x: REPLICATE, w: REPLICATE}
    if isinstance(bias, fx.Node):
        demands[bias] = REPLICATE
    return Strategy(demands, REPLICATE)


@register(aten.mm, aten.bmm, aten.matmul)
def mm(ctx: RuleContext, node: fx.Node) -> Strategy:
    return matmul_strategy(ctx, node, node.args[0], node.args[1])


@register(aten.addmm, aten.baddbmm)
def addmm(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``beta * bias + alpha * (a @ b)``."""
    return matmul_strategy(ctx, node, node.args[1], node.args[2], bias=node.args[0])
