"""``scaled_dot_product_attention`` over ``[B, H, T, D]``: heads shard, nothing else does.

Grouped-query attention (``enable_gqa``, ``Hq = g * Hkv``, query head h reads KV head h // g): rank r's
query heads ``[lo, hi)`` need KV heads ``[lo // g, (hi - 1) // g + 1)``, and the rank's local SDPA (again
with ``enable_gqa``) is right only when every one of those KV heads serves the same number m of the rank's
query heads, so that local query i reads local KV head i // m. KV slices of neighbouring ranks may overlap
(a KV head replicated on the ranks that need it). Where the counts differ on a rank (SmolLM2's 9 query heads
over 3 KV heads split 5+4: rank 0 serves 3 query heads from KV head 0 and 2 from KV head 1), the rank still
reads only the KV heads it needs (``kv_cover``), and its local attention first repeats each of them for the
query heads it serves (slice + expand + cat along the head dim), so every query head meets its own KV head.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from tpcompile.passes.graph_queries import kv_cover, kv_repeats, kv_split, query_split
from tpcompile.passes.ops.common import concrete
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import Lowering, LoweringBuilder, RuleContext, Strategy, shape_of
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
    lower = None
    kvpl = kv_split(qpl, group) if group > 1 else qpl
    if kvpl is None:
        kvpl = kv_cover(qpl, group)
        if kvpl is None:
            return replicated
        lower = _repeat_kv_per_query(qpl, group, heads)
    demands: dict[fx.Node, Placement] = {q: qpl, k: kvpl, v: kvpl}
    if isinstance(mask, fx.Node):
        mshape = shape_of(mask)
        mdim = len(mshape) - 3
        demands[mask] = qpl.with_dim(mdim) if mdim >= 0 and mshape[mdim] != 1 else REPLICATE
    return Strategy(demands, qpl.with_dim(heads), lower)


def _repeat_kv_per_query(q: Shard, group: int, heads: int) -> Lowering:
    """Rank r's attention when its query heads do not spread evenly over its KV heads: each local KV head
    repeated for the query heads it serves (``kv_repeats``), then the op as it is (one KV head per query head;
    ``enable_gqa`` with equal counts is plain attention). Ranks with even counts keep the op unchanged."""

    def lower(b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
        repeats = kv_repeats(q, group, b.rank)
        if len(set(repeats)) == 1:
            return b.call(node.target, *args, **kwargs)
        ndim = len(shape_of(node.args[1]))

        def per_query(kv: Any) -> fx.Node:
            parts = []
            for j, count in enumerate(repeats):
                one = b.call(aten.slice.Tensor, kv, heads, j, j + 1)
                sizes = [-1] * ndim
                sizes[heads] = count
                parts.append(b.call(aten.expand.default, one, sizes))
            return b.call(aten.cat.default, parts, heads)

        return b.call(node.target, args[0], per_query(args[1]), per_query(args[2]), *args[3:], **kwargs)

    return lower
