"""Stacked expert weights: a stored tensor of 3 or more dims read by a batched product ``a @ b`` (``b`` the
weight, possibly through a transpose), its leading dim a batch dim of the product (one matrix per expert).

The plan decides such a weight in one of two ways (``tpcompile/plan/experts.py``):

- ``expert``: the batch dim is split (expert parallelism). The product is then sharded on its batch dim
  (the matmul rule's batch-dim case), everything per expert stays local, and a sum over the expert dim
  is a Partial: one all-reduce for the whole block;
- ``colwise``: the output-feature dim is split, exactly like a column-parallel linear; the next product
  over that dim is row-parallel (Partial), as for an MLP.

This module only turns a free weight plus its decision into the placement the product demands; the
matmul rule does the rest.
"""

from __future__ import annotations

from tpcompile.passes.placement import Placement, Replicate, Shard, balanced_split
from tpcompile.passes.propagate import AnyPlacement, FreeView, RuleContext


def stacked_weight_placement(
    ctx: RuleContext, pa: Placement, pb_raw: AnyPlacement | None, sb: tuple[object, ...]
) -> Shard | None:
    """The placement a planned stack of expert weights (``b`` of a product, seen as ``sb``) must have, or
    None when ``b`` is not such a weight or the plan leaves it to propagation."""
    if not isinstance(pb_raw, FreeView) or len(sb) < 3 or pb_raw.window is not None:
        return None
    decision = ctx.plan.decisions.get(ctx.names.get(pb_raw.root, ""))
    # a permutation of the stored tensor that keeps its leading (expert) dim first
    if (
        decision is None
        or pb_raw.dims[0] != 0
        or sorted(d for d in pb_raw.dims if d is not None) != list(range(len(sb)))
    ):
        return None
    if decision.style == "expert" and ctx.shardable(pb_raw, 0):
        experts = int(sb[0])  # type: ignore[call-overload]
        return Shard(0, decision.sizes or balanced_split(experts, ctx.tp))
    last = len(sb) - 1
    if decision.style == "colwise" and isinstance(pa, Replicate) and ctx.shardable(pb_raw, last):
        features = int(sb[last])  # type: ignore[call-overload]
        return Shard(last, decision.sizes or balanced_split(features, ctx.tp), decision.starts)
    return None
