"""``einsum``: placements follow the subscript letters.

A letter sharded in one operand must be sharded the same way in every operand that has it (replicated
operands are sliced locally; size-1 broadcast dims are left alone). A sharded letter kept in the output
shards the output there; a sharded letter summed away makes the output Partial. Partial operands are
linear only when they are the single partial one; otherwise they are reduced first.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.ops import register
from tpcompile.passes.ops.common import aten, concrete, replicate_all
from tpcompile.passes.placement import PARTIAL, REPLICATE, Partial, Placement, Shard
from tpcompile.passes.propagate import RuleContext, Strategy, shape_of


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
    pls = [concrete(ctx.placement(o)) for o in operands]
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
    return Strategy(demands, result)
