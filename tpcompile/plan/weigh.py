"""Weighing exact plans with the cost model (``tpcompile compile --profile NAME``).

The plan search (``plan/auto.py``) splits every chain it can. That is not always the fastest plan: each
split chain costs a collective per step, and where collectives are slow (gloo over TCP, hosts over
Ethernet) keeping a chain whole on every rank (more weight bytes per rank, one all-reduce fewer per layer)
can win. The chains the search split fall into classes of one structure (``ChainClass``: every layer's
attention projections are one class, its MLP's another). A candidate keeps some classes whole and lets
the search plan the rest; starting from the search's own plan, the candidate that keeps one more class
whole and is predicted fastest is taken, while it beats the current one by more than ``GAIN``. A candidate
that splits no weight at all is not one (that is ``--tp 1``, which ``tpcompile plan`` weighs), and one that
does not fit the profile's memory is predicted at 0 tokens/s.

Invariant: every candidate is a plan the search itself produced (only told which sites not to try), so it
is exact by the same propagation; the choice depends on the graph's structure and the profile, never on
names. Without a profile nothing is weighed and the search's plan is the plan.
"""

from __future__ import annotations

from collections.abc import Callable

from tpcompile.errors import UsageError
from tpcompile.passes.rule_api import Propagation
from tpcompile.plan.spec import ChainClass, ShardingPlan, WeighedPlan
from tpcompile.runtime.format.placement import Pieces, Shard

#: a candidate must be predicted this much faster than the plan it would replace (ties keep the split)
GAIN = 0.01

Search = Callable[[dict[str, str]], tuple[ShardingPlan, Propagation]]
Speed = Callable[[Propagation], float]  # predicted decode tokens/s of a propagated plan (0: does not fit)


def _collectives(prop: Propagation) -> int:
    return sum(1 for _ in prop.collectives())


def _splits_something(prop: Propagation) -> bool:
    """A plan that splits no weight is tp=1's work on every rank: for that, compile with --tp 1."""
    return any(isinstance(pl, Shard | Pieces) for pl in prop.roots.values())


def weigh_plans(search: Search, speed: Speed, profile: str) -> tuple[ShardingPlan, Propagation]:
    """The plan predicted fastest on ``profile`` among the search's plan and those keeping chain classes
    whole; ``plan.weighed`` lists every candidate tried (the chosen one marked)."""
    plan, prop = search({})
    classes = list(plan.chain_classes)
    why = f"kept whole: the plan that splits it is predicted slower on {profile} (tpcompile explain)"
    best = (plan, prop, WeighedPlan((), _collectives(prop), speed(prop)))
    weighed = [best[2]]
    kept: list[ChainClass] = []
    while len(kept) < len(classes):
        step = None
        for cls in classes:
            if cls in kept:
                continue
            trial = [*kept, cls]
            try:
                p, pr = search({key: why for c in trial for key in c.keys})
            except UsageError:  # nothing left to split at this tp: not a candidate
                continue
            if pr.refusals or not _splits_something(pr):
                continue
            w = WeighedPlan(tuple(c.label for c in trial), _collectives(pr), speed(pr))
            weighed.append(w)
            if step is None or w.decode_tokens_per_s > step[2].decode_tokens_per_s:
                step = (p, pr, w, cls)
        if step is None or step[2].decode_tokens_per_s <= best[2].decode_tokens_per_s * (1 + GAIN):
            break
        best = step[:3]
        kept.append(step[3])
    chosen_plan, chosen_prop, chosen = best
    chosen_plan.weighed = [
        WeighedPlan(w.kept_whole, w.collectives, w.decode_tokens_per_s, w is chosen) for w in weighed
    ]
    chosen_plan.weighed_on = profile
    chosen_plan.chain_classes = classes
    return chosen_plan, chosen_prop
