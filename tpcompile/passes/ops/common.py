"""Helpers shared by the op rules."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.placement import REPLICATE, Placement, Shard
from tpcompile.passes.propagate import FreeView, RuleContext, Strategy, shape_of

aten = torch.ops.aten


def tensor_inputs(ctx: RuleContext, node: fx.Node) -> list[fx.Node]:
    """Tensor-valued inputs of a node, in argument order, without duplicates."""
    seen: list[fx.Node] = []
    for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)):
        if ctx.is_tensor(a) and a not in seen:
            seen.append(a)
    return seen


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def replicate_all(ctx: RuleContext, node: fx.Node) -> Strategy:
    return Strategy({a: REPLICATE for a in tensor_inputs(ctx, node)}, REPLICATE)


def concrete(pl: Placement | FreeView | None) -> Placement:
    """A free stored tensor counts as Replicate where a rule has no better use for it."""
    if pl is None or isinstance(pl, FreeView):
        return REPLICATE
    return pl


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shard_local(pl: Shard, rank: int) -> int:
    return pl.sizes[rank]


def ndim(node: fx.Node) -> int:
    return len(shape_of(node))
