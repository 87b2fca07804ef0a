"""Weighing exact plans with the cost model (``tpcompile compile --profile NAME``).

The plan search (``plan/auto.py``) splits every chain it can, grouped-query heads along whole KV groups.
That is not always the fastest plan, for two reasons the cost model sees:
- **balance**: SmolLM2's 9 query heads over 3 KV heads split 6+3 at tp=2 along whole groups, so rank 0
  streams more attention weights and the other waits for it at every all-reduce; the balanced split (5+4,
  the KV head both ranks need held by both) evens the ranks out. The search makes it when asked
  (``balanced``); it is a candidate when it differs from the search's plan.
- **collectives**: each split chain costs a collective per step, and where collectives are slow (gloo over
  TCP, hosts over Ethernet) a chain kept whole on every rank (more weight bytes per rank, one all-reduce
  fewer per layer) wins. The chains the search split fall into classes of one structure (``ChainClass``:
  every layer's attention projections are one class, its MLP's another); starting from the better of the
  two splits above, the candidate that keeps one more class whole and is predicted fastest is taken, while
  it beats the current plan by more than ``GAIN``.
A candidate that splits no weight at all is not one (that is ``--tp 1``, which ``tpcompile plan`` weighs),
and one that does not fit the profile's memory is predicted at 0 tokens/s.

Invariant: every candidate is a plan the search itself produced (only told which sites not to try, or to
balance its units), so it is exact by the same propagation; the choice depends on the graph's structure and
the profile, never on names. Without a profile nothing is weighed: the plan is the search's, or its
balanced variant when that leaves the largest rank fewer bytes (``balance_by_bytes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tpcompile.errors import UsageError
from tpcompile.passes.rule_api import Propagation
from tpcompile.plan.spec import ChainClass, ShardingPlan, WeighedPlan
from tpcompile.runtime.format.placement import Pieces, Shard

#: a candidate must be predicted this much faster than the plan it would replace (ties keep the split)
GAIN = 0.01

Search = Callable[[dict[str, str], bool], tuple[ShardingPlan, Propagation]]  # (keep whole, balanced)
Speed = Callable[[Propagation], float]  # predicted decode tokens/s of a propagated plan (0: does not fit)
RankBytes = Callable[[Propagation], int]  # the most bytes one rank of a propagated plan holds


def _collectives(prop: Propagation) -> int:
    return sum(1 for _ in prop.collectives())


def _splits_something(prop: Propagation) -> bool:
    """A plan that splits no weight is tp=1's work on every rank: for that, compile with --tp 1."""
    return any(isinstance(pl, Shard | Pieces) for pl in prop.roots.values())


def _balanced_variant(search: Search, plan: ShardingPlan) -> tuple[ShardingPlan, Propagation] | None:
    """The search's balanced plan when it differs from ``plan`` and is exact (None otherwise)."""
    try:
        alt_plan, alt_prop = search({}, True)
    except UsageError:  # a balanced split that cannot be planned at this tp is no candidate
        return None
    if alt_plan.decisions == plan.decisions or alt_prop.refusals:
        return None
    return alt_plan, alt_prop


def balance_by_bytes(search: Search, largest_rank: RankBytes) -> tuple[ShardingPlan, Propagation]:
    """Without a profile: the search's plan, or its balanced variant when that leaves the largest rank
    fewer bytes (weights and a full KV cache: what must fit on one device, and about what its decode step
    reads while the other ranks wait for it at every all-reduce)."""
    plan, prop = search({}, False)
    variant = _balanced_variant(search, plan)
    if variant is not None and largest_rank(variant[1]) < largest_rank(prop):
        return variant
    return plan, prop


def weigh_plans(search: Search, speed: Speed, profile: str) -> tuple[ShardingPlan, Propagation]:
    """The plan predicted fastest on ``profile`` among the search's plan, its balanced variant and those
    keeping chain classes whole; ``plan.weighed`` lists every candidate tried (the chosen one marked)."""
    plan, prop = search({}, False)
    best = (plan, prop, WeighedPlan((), _collectives(prop), speed(prop)))
    weighed = [best[2]]
    balanced = False
    variant = _balanced_variant(search, plan)
    if variant is not None:
        alt_plan, alt_prop = variant
        alt = WeighedPlan((), _collectives(alt_prop), speed(alt_prop), balanced=True)
        weighed.append(alt)
        if alt.decode_tokens_per_s > best[2].decode_tokens_per_s * (1 + GAIN):
            best, balanced = (alt_plan, alt_prop, alt), True
    classes = list(best[0].chain_classes)
    why = f"kept whole: the plan that splits it is predicted slower on {profile} (tpcompile explain)"
    kept: list[ChainClass] = []
    while len(kept) < len(classes):
        step = None
        for cls in classes:
            if cls in kept:
                continue
            trial = [*kept, cls]
            try:
                p, pr = search({key: why for c in trial for key in c.keys}, balanced)
            except UsageError:  # nothing left to split at this tp: not a candidate
                continue
            if pr.refusals or not _splits_something(pr):
                continue
            w = WeighedPlan(tuple(c.label for c in trial), _collectives(pr), speed(pr), balanced=balanced)
            weighed.append(w)
            if step is None or w.decode_tokens_per_s > step[2].decode_tokens_per_s:
                step = (p, pr, w, cls)
        if step is None or step[2].decode_tokens_per_s <= best[2].decode_tokens_per_s * (1 + GAIN):
            break
        best = step[:3]
        kept.append(step[3])
    chosen_plan, chosen_prop, chosen = best
    chosen_plan.weighed = [dataclasses.replace(w, chosen=w is chosen) for w in weighed]
    chosen_plan.weighed_on = profile
    chosen_plan.chain_classes = classes
    return chosen_plan, chosen_prop
