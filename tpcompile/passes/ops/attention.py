"""``scaled_dot_product_attention`` over ``[B, H, T, D]``: heads shard, nothing else does.

Grouped-query attention (``enable_gqa``, ``Hq = g * Hkv``, query head h reads KV head h // g): rank r's
query heads ``[lo, hi)`` need KV heads ``[lo // g, (hi - 1) // g + 1)``, and the rank's local SDPA (again
with ``enable_gqa``) is right only when every one of those KV heads serves the same number m of the rank's
query heads, so that local query i reads local KV head i // m. KV slices of neighbouring ranks may overlap
(a KV head replicated on the ranks that need it). Where the counts differ on a rank (SmolLM2's 9 query heads
over 3 KV heads split 5+4: rank 0 serves 3 query heads from KV head 0 and 2 from KV head 1), the rank still
reads only the KV heads it needs (``kv_cover``), and its local attention runs once per KV head with the query
heads that KV head serves (slices: views of the cache), the outputs joined along the head dim.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from tpcompile.passes.graph_queries import kv_cover, kv_repeats, kv_split, query_split, shape_of
from tpcompile.passes.ops.common import concrete
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import Lowering, LoweringBuilder, RuleContext, Strategy
from tpcompile.runtime.format.placement import REPLICATE, Partial, Placement, Shard


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: RuleContext, node: fx.Node) -> Strategy:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    hq, hkv = shape_of(q)[-3], shape_of(k)[-3]
    group = hq // hkv if isinstance(hq, int) and isinstance(hkv, int) and hkv and hq % hkv == 0 else None
    pls = {t: concrete(ctx.placement(t)) for t in (q, k, v)}
    heads = len(shape_of(q)) - 3
    everything = [t for t in (q, k, v, mask) if isinstance(t, fx.Node)]
    replicated = Strategy(dict.fromkeys(everything, REPLICATE), REPLICATE)
    if group is None or any(isinstance(p, Partial) for p in pls.values()):
        return replicated
    if group > 1 and not node.kwargs.get("enable_gqa"):
        return replicated  # different head counts without GQA: not an attention we understand
    qpl: Shard | None = None
    pq, pk = pls[q], pls[k]
    if isinstance(pq, Shard) and pq.dim == heads:
        qpl = pq
    elif isinstance(pk, Shard) and pk.dim == heads:
        qpl = query_split(pk, group)
    if qpl is None:
        return replicated
    kvpl = kv_split(qpl, group) if group > 1 else qpl
    uneven = kvpl is None
    if kvpl is None:
        kvpl = kv_cover(qpl, group)
        if kvpl is None:
            return replicated
    demands: dict[fx.Node, Placement] = {q: qpl, k: kvpl, v: kvpl}
    mask_heads = None
    if isinstance(mask, fx.Node):
        mshape = shape_of(mask)
        mdim = len(mshape) - 3
        split_mask = mdim >= 0 and mshape[mdim] != 1
        demands[mask] = qpl.with_dim(mdim) if split_mask else REPLICATE
        mask_heads = mdim if split_mask else None
    lower = _attend_per_kv_head(qpl, group, heads, mask_heads) if uneven else None
    return Strategy(demands, qpl.with_dim(heads), lower)


def _attend_per_kv_head(q: Shard, group: int, heads: int, mask_heads: int | None) -> Lowering:
    """Rank r's attention when its query heads do not spread evenly over its KV heads: one call per local
    KV head, with the query heads it serves (``kv_repeats``) and that KV head (a slice: a view of the cache,
    so nothing is copied before the runtime cuts the keys to the written positions), the outputs joined
    along the head dim. ``mask_heads``: the mask's head dim when the mask is split by query head. Ranks with
    even counts keep the op unchanged."""

    def lower(b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        repeats = kv_repeats(q, group, b.rank)
        if len(set(repeats)) == 1:
            return b.call(node.target, *args, **kwargs)
        query, key, value, *rest = args
        outs, lo = [], 0
        for j, count in enumerate(repeats):
            part = list(rest)
            part_kwargs = dict(kwargs)
            if mask_heads is not None:  # a mask split by query head: the rows of this call's heads
                mask = part[0] if part else part_kwargs["attn_mask"]
                mask = b.call(aten.slice.Tensor, mask, mask_heads, lo, lo + count)
                if part:
                    part[0] = mask
                else:
                    part_kwargs["attn_mask"] = mask
            outs.append(
                b.call(
                    node.target,
                    b.call(aten.slice.Tensor, query, heads, lo, lo + count),
                    b.call(aten.slice.Tensor, key, heads, j, j + 1),
                    b.call(aten.slice.Tensor, value, heads, j, j + 1),
                    *part,
                    **part_kwargs,
                )
            )
            lo += count
        return b.call(aten.cat.default, outs, heads)

    return lower
