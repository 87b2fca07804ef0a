"""Small helpers shared by the op rules."""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.rule_api import FreeView, RuleContext, Strategy
from tpcompile.runtime.format.placement import REPLICATE, Partial, Placement


def tensor_inputs(ctx: RuleContext, node: fx.Node) -> list[fx.Node]:
    """Tensor-valued inputs of a node, in argument order, without duplicates (``all_input_nodes`` is fx's
    own list of them, kept with the node: no walk of its arguments per call)."""
    return [a for a in node.all_input_nodes if ctx.is_tensor(a)]


def replicate_all(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Every tensor input whole, the output (or each output) replicated."""
    demands: dict[fx.Node, Placement] = {a: REPLICATE for a in tensor_inputs(ctx, node)}
    val = node.meta.get("val")
    if isinstance(val, tuple | list):
        return Strategy(demands, tuple(REPLICATE for _ in val))
    return Strategy(demands, REPLICATE if ctx.is_tensor(node) else None)


def concrete(pl: Placement | FreeView | None) -> Placement:
    """A free stored tensor counts as Replicate where a rule has no better use for it."""
    if pl is None or isinstance(pl, FreeView):
        return REPLICATE
    return pl


def whole(pl: Placement) -> Placement:
    """``pl``, with a partial sum counted as replicated (the consumer needs it reduced)."""
    return REPLICATE if isinstance(pl, Partial) else pl
