"""Matrix products: ``linear``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``.

Megatron's two layouts fall out of one rule for ``A[..., m, k] @ B[..., k, n]``:
column-parallel (A R, B S(n)) -> S(n); row-parallel (A S(k), B S(k)) -> P. A weight still free is split the
way the plan says (its decision names the stored dim, whatever view of the weight the product reads:
``W.T``, ``W`` as ``[in, out]``, a permuted or reshaped weight), or the way its activation asks. A
row-parallel bias is stored on rank 0 only (Partial), so it is added once. Batch dims shard like elementwise
ops (stacked expert weights split on their expert dim).
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.graph_queries import shape_of
from tpcompile.passes.ops.common import concrete, whole
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import AnyPlacement, FreeView, RuleContext, SiteKind, Strategy
from tpcompile.plan.spec import Style
from tpcompile.runtime.format.placement import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard


def _weight(ctx: RuleContext, raw: AnyPlacement | None, roles: dict[Style, int], planned: bool) -> Placement:
    """The placement of a product's weight operand: with ``planned`` (its activation is replicated), what
    the plan gives a free stored weight in this product; else its concrete placement."""
    decided = ctx.planned(raw, roles) if planned else None
    return whole(decided if decided is not None else concrete(raw))


def _kept_whole(ctx: RuleContext, raw: AnyPlacement | None) -> bool:
    """The plan (``--plan ... replicate``) says this stored weight stays whole."""
    decision = ctx.decision(raw)
    return decision is not None and decision.style is Style.REPLICATE


def _styles(raw: AnyPlacement | None, node: fx.Node, want: Placement, roles: dict[Style, int]) -> dict:
    """The role in which a free stored operand ends up split (from the dim the product demands)."""
    if not isinstance(raw, FreeView) or not isinstance(want, Shard | Partial):
        return {}
    if isinstance(want, Partial):
        return {node: Style.PARTIAL}
    role = next((style for style, dim in roles.items() if dim == want.dim), Style.SHARDED)
    return {node: role}


def matmul_strategy(
    ctx: RuleContext, node: fx.Node, a: fx.Node, b: fx.Node, bias: fx.Node | None = None
) -> Strategy:
    """``a[..., m, k] @ b[..., k, n]`` (+ bias broadcast over the output)."""
    sa, sb = shape_of(a), shape_of(b)
    if len(sa) < 2 or len(sb) < 2:
        ins = [x for x in (a, b, bias) if x is not None]
        return Strategy(dict.fromkeys(ins, REPLICATE), REPLICATE)
    out_nd = len(shape_of(node))
    ka, kb, nb = len(sa) - 1, len(sb) - 2, len(sb) - 1
    roles = {Style.COLWISE: nb, Style.ROWWISE: kb}
    pa, pb_raw = whole(concrete(ctx.placement(a))), ctx.placement(b)
    ctx.offer_site(pb_raw, a, nb, SiteKind.PRODUCT)
    pb = _weight(ctx, pb_raw, roles, planned=isinstance(pa, Replicate))
    # a contraction over an overlapping shard would count the shared part twice
    if isinstance(pa, Shard) and pa.overlapping and pa.dim == ka:
        pa = REPLICATE
    if isinstance(pb, Shard) and pb.overlapping and pb.dim == kb:
        pb = REPLICATE
    demands: dict[fx.Node, Placement]
    out: Placement

    if isinstance(pa, Shard) and pa.dim == ka:  # contraction dim sharded: row-parallel
        if _kept_whole(ctx, pb_raw) or (isinstance(pb, Shard) and pb.dim != kb):
            demands = {a: REPLICATE, b: pb}
            out = pb.with_dim(out_nd - 1) if isinstance(pb, Shard) and pb.dim == nb else REPLICATE
        else:
            demands, out = {a: pa, b: pa.with_dim(kb)}, PARTIAL
    elif isinstance(pa, Replicate) and isinstance(pb, Shard) and pb.dim == kb:
        demands, out = {a: pb.with_dim(ka), b: pb}, PARTIAL
    elif isinstance(pa, Replicate) and isinstance(pb, Shard) and pb.dim == nb:
        demands, out = {a: pa, b: pb}, pb.with_dim(out_nd - 1)
    elif isinstance(pa, Shard) and pa.dim == ka - 1:  # rows of a sharded (sequence / m)
        demands, out = {a: pa, b: REPLICATE}, pa.with_dim(out_nd - 2)
    elif isinstance(pa, Shard) or isinstance(pb, Shard):  # a batch dim
        demands, out = _batch_strategy(a, b, pa, pb, out_nd)
    else:
        demands, out = {a: pa, b: pb}, REPLICATE

    styles = _styles(pb_raw, b, demands[b], roles)
    if isinstance(pb_raw, FreeView) and (decision := ctx.decision(pb_raw)) is not None:
        styles = {b: decision.style} if isinstance(demands[b], Shard) else styles
    if bias is not None:
        demands[bias] = _bias_demand(out, shape_of(bias), out_nd)
        styles = {**styles, **_bias_style(ctx.placement(bias), bias, demands[bias])}
    return Strategy(demands, out, styles=styles)


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


def _bias_style(raw: AnyPlacement | None, bias: fx.Node, want: Placement) -> dict:
    if not isinstance(raw, FreeView):
        return {}
    if isinstance(want, Partial):
        return {bias: Style.PARTIAL}
    return {bias: Style.COLWISE} if isinstance(want, Shard) else {}


@register(aten.linear)
def linear(ctx: RuleContext, node: fx.Node) -> Strategy:
    """``x @ W.T + b`` with ``W[out, in]``: the weight is seen through a transpose."""
    x, w = node.args[0], node.args[1]
    assert isinstance(x, fx.Node) and isinstance(w, fx.Node)
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    nd = len(shape_of(node))
    roles = {Style.COLWISE: 0, Style.ROWWISE: 1}
    px, pw_raw = whole(concrete(ctx.placement(x))), ctx.placement(w)
    if isinstance(px, Shard) and px.overlapping and px.dim == nd - 1:
        px = REPLICATE
    ctx.offer_site(pw_raw, x, 0, SiteKind.PRODUCT)
    pw = _weight(ctx, pw_raw, roles, planned=isinstance(px, Replicate))
    demands: dict[fx.Node, Placement]
    out: Placement
    if isinstance(px, Shard) and px.dim == nd - 1:
        if _kept_whole(ctx, pw_raw) or (isinstance(pw, Shard) and pw.dim == 0):
            return _linear_replicated(x, w, bias)
        demands, out = {x: px, w: px.with_dim(1)}, PARTIAL
    elif isinstance(px, Shard):
        demands, out = {x: px, w: REPLICATE}, px.with_dim(px.dim)
    elif isinstance(pw, Shard) and pw.dim == 0:
        demands, out = {x: px, w: pw}, pw.with_dim(nd - 1)
    elif isinstance(pw, Shard) and pw.dim == 1 and not pw.overlapping:
        demands, out = {x: pw.with_dim(nd - 1), w: pw}, PARTIAL
    else:
        return _linear_replicated(x, w, bias)
    styles = _styles(pw_raw, w, demands[w], roles)
    if isinstance(bias, fx.Node):
        demands[bias] = _bias_demand(out, shape_of(bias), nd)
        styles = {**styles, **_bias_style(ctx.placement(bias), bias, demands[bias])}
    return Strategy(demands, out, styles=styles)


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
