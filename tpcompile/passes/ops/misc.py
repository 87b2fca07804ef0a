"""Ops without tensor data flow to shard: factories (replicated), tuple access, shape queries, assertions."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.ops.registry import aten, aten_ops, register
from tpcompile.passes.rule_api import LoweringBuilder, RuleContext, Strategy
from tpcompile.runtime.format.placement import REPLICATE, Shard

FACTORIES = (
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "scalar_tensor",
    "tensor",
    "linspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "empty_strided",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "_local_scalar_dense",
)


@register(*aten_ops(*FACTORIES))
def factory(ctx: RuleContext, node: fx.Node) -> Strategy:
    """A tensor made from shapes and scalars is identical on every rank."""
    return Strategy({}, REPLICATE if ctx.is_tensor(node) else None)


@register(operator.getitem)
def getitem(ctx: RuleContext, node: fx.Node) -> Strategy:
    src, index = node.args
    pl = ctx.prop.placements.get(src) if isinstance(src, fx.Node) else None
    if isinstance(pl, tuple) and isinstance(index, int) and index < len(pl):
        return Strategy({}, pl[index])
    return Strategy({}, REPLICATE if ctx.is_tensor(node) else None)


@register(aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset)
def shape_query(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Symbolic sizes are never sharded dims (those are static), so they are the same on every rank."""
    return Strategy({}, None)


def _lower_drop_sizes(
    b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> fx.Node:
    kw = {k: v for k, v in kwargs.items() if k not in ("size", "stride")}
    return b.call(node.target, args[0], None, None, *args[3:], **kw)


@register(aten._assert_tensor_metadata)
def assert_metadata(ctx: RuleContext, node: fx.Node) -> Strategy:
    """Export's dtype/shape assertions: shapes of sharded tensors are local, so size checks are dropped."""
    x = node.args[0]
    p = ctx.placement(x)
    lower = _lower_drop_sizes if isinstance(p, Shard) else None
    return Strategy({}, None, lower)


@register(
    aten._assert_scalar,
    aten.sym_constrain_range_for_size,
    aten.sym_constrain_range,
    aten._assert_async,
    torch.ops.aten._print,
)
def assertion(ctx: RuleContext, node: fx.Node) -> Strategy:
    return Strategy({}, None)
