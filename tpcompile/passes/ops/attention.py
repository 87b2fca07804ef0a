"""``scaled_dot_product_attention`` over ``[B, H, T, D]``: heads shard, nothing else does.

Grouped-query attention (``enable_gqa``, ``Hq = g * Hkv``, query head h reads KV head h // g): rank r's
query heads ``[lo, hi)`` need KV heads ``[lo // g, (hi - 1) // g + 1)``, and the rank's local SDPA (again
with ``enable_gqa``) is right only when every one of those KV heads serves the same number m of the rank's
query heads, so that local query i reads local KV head i // m. KV slices of neighbouring ranks may overlap
(a KV head replicated on the ranks that need it). Splits where the counts differ are replicated, never
guessed.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.graph_queries import kv_split, query_split
from tpcompile.passes.ops.common import concrete
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import RuleContext, Strategy, shape_of
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
    if kvpl is None:
        return replicated
    demands: dict[fx.Node, Placement] = {q: qpl, k: kvpl, v: kvpl}
    if isinstance(mask, fx.Node):
        mshape = shape_of(mask)
        mdim = len(mshape) - 3
        demands[mask] = qpl.with_dim(mdim) if mdim >= 0 and mshape[mdim] != 1 else REPLICATE
    return Strategy(demands, qpl.with_dim(heads))
