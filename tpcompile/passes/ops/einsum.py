"""``einsum``: placements follow the subscript letters.

A letter sharded in one operand must be sharded the same way in every operand that has it (replicated
operands are sliced locally; size-1 broadcast dims are left alone). A sharded letter kept in the output
shards the output there; a sharded letter summed away makes the output Partial. Partial operands are
linear only when they are the single partial one; otherwise they are reduced first.

A projection ``einsum("btd,dhk->bthk", x, W)`` with ``W`` a free stored tensor is a plan site like a
linear: its output-feature letters are those of ``W`` kept in the output and absent from ``x`` (``h``, then
``k``), and the plan splits the first of them; the contracted letter ``d`` is its row-parallel dim.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.graph_queries import shape_of
from tpcompile.passes.ops.common import concrete, replicate_all
from tpcompile.passes.ops.registry import aten, register
from tpcompile.passes.rule_api import FreeView, RuleContext, SiteKind, Strategy
from tpcompile.plan.spec import Style
from tpcompile.runtime.format.placement import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard


def _subscripts(equation: str, n_inputs: int) -> tuple[list[str], str] | None:
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, _, rhs = eq.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != n_inputs:
        return None
    if not _:
        counts = {c: lhs.count(c) for c in set(lhs) if c != ","}
        rhs = "".join(sorted(c for c, n in counts.items() if n == 1))
    return inputs, rhs


@register(aten.einsum)
def einsum(ctx: RuleContext, node: fx.Node) -> Strategy:
    equation, operands = node.args[0], list(node.args[1])
    parsed = _subscripts(equation, len(operands)) if isinstance(equation, str) else None
    if parsed is None or not all(isinstance(o, fx.Node) for o in operands):
        return replicate_all(ctx, node)
    subs, out = parsed
    raws = [ctx.placement(o) for o in operands]
    pls = [concrete(p) for p in raws]
    if len(operands) == 2:  # a projection of a replicated activation by a free stored weight
        for w, x in ((1, 0), (0, 1)):
            roles = _weight_roles(subs[w], subs[x], out)
            if roles and isinstance(raws[w], FreeView) and isinstance(pls[x], Replicate):
                ctx.offer_site(raws[w], operands[x], roles[Style.COLWISE], SiteKind.PRODUCT)
                pls[w] = ctx.planned(raws[w], roles) or pls[w]
    n_partial = sum(isinstance(p, Partial) for p in pls)
    partial_in = n_partial == 1 and all(isinstance(p, Partial) or p == REPLICATE for p in pls)
    if n_partial and not partial_in:
        pls = [REPLICATE if isinstance(p, Partial) else p for p in pls]
    shards = [(sub[p.dim], p) for sub, p in zip(subs, pls, strict=True) if isinstance(p, Shard)]
    lead = shards[0] if shards else None
    if lead is None:
        return Strategy(dict(zip(operands, pls, strict=True)), PARTIAL if partial_in else REPLICATE)
    letter, split = lead
    demands: dict[fx.Node, Placement] = {}
    for operand, sub in zip(operands, subs, strict=True):
        if letter in sub and shape_of(operand)[sub.index(letter)] != 1:
            demands[operand] = split.with_dim(sub.index(letter))
        else:
            demands[operand] = REPLICATE
    result: Placement = split.with_dim(out.index(letter)) if letter in out else PARTIAL
    styles = {
        o: Style.COLWISE if letter in out else Style.ROWWISE
        for o, raw in zip(operands, raws, strict=True)
        if isinstance(raw, FreeView) and isinstance(demands[o], Shard)
    }
    return Strategy(demands, result, styles=styles)


def _weight_roles(weight: str, activation: str, out: str) -> dict[Style, int]:
    """The dims of an einsum weight operand that a plan splits: its first output-feature letter (colwise)
    and its first contracted letter (rowwise); empty when it has no output-feature letter."""
    features = [i for i, c in enumerate(weight) if c in out and c not in activation]
    contracted = [i for i, c in enumerate(weight) if c in activation and c not in out]
    if not features:
        return {}
    roles = {Style.COLWISE: features[0]}
    if contracted:
        roles[Style.ROWWISE] = contracted[0]
    return roles
