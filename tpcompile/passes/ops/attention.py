"""``scaled_dot_product_attention`` over ``[B, H, T, D]``: heads shard, nothing else does.

With grouped-query attention (``enable_gqa``, ``Hq = g * Hkv``) rank r's query heads must be exactly the
groups of its KV heads: KV sizes are the query sizes divided by g. When they are not whole, everything is
replicated (correct) rather than guessed.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.ops import register
from tpcompile.passes.ops.common import aten, concrete
from tpcompile.passes.placement import REPLICATE, Partial, Placement, Shard
from tpcompile.passes.propagate import RuleContext, Strategy, shape_of


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: RuleContext, node: fx.Node) -> Strategy:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    hq, hkv = shape_of(q)[-3], shape_of(k)[-3]
    group = hq // hkv if isinstance(hq, int) and isinstance(hkv, int) and hkv and hq % hkv == 0 else None
    pls = {t: concrete(ctx.placement(t)) for t in (q, k, v)}
    heads = len(shape_of(q)) - 3
    qpl: Shard | None = None
    for t in (q, k, v):
        p = pls[t]
        if isinstance(p, Shard) and p.dim == heads and group is not None:
            try:
                qpl = p if t is q else p.scaled(group)
            except ValueError:
                qpl = None
            break
    everything = [t for t in (q, k, v, mask) if isinstance(t, fx.Node)]
    if qpl is None or group is None or any(isinstance(p, Partial) for p in pls.values()):
        return Strategy(dict.fromkeys(everything, REPLICATE), REPLICATE)
    try:
        kvpl = qpl.scaled(1, group)
    except ValueError:
        return Strategy(dict.fromkeys(everything, REPLICATE), REPLICATE)
    demands: dict[fx.Node, Placement] = {q: qpl, k: kvpl, v: kvpl}
    if isinstance(mask, fx.Node):
        mshape = shape_of(mask)
        mdim = len(mshape) - 3
        demands[mask] = Shard(mdim, qpl.sizes) if mdim >= 0 and mshape[mdim] != 1 else REPLICATE
    return Strategy(demands, Shard(heads, qpl.sizes))
