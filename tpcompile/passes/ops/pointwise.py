"""Elementwise ops with broadcasting.

S and S (same dim, same sizes) -> S; S and R -> S, slicing the R operand locally unless it broadcasts
along the shard; a Partial survives only ops that are linear in it (add/sub of partials, mul/div by a
replicated factor, unary copies); anything else reduces it first.
"""

from __future__ import annotations

import enum
import numbers

import torch.fx as fx

from tpcompile.passes.graph_queries import packet, shape_of
from tpcompile.passes.ops.common import concrete, tensor_inputs
from tpcompile.passes.ops.registry import aten, aten_ops, register
from tpcompile.passes.rule_api import RuleContext, Strategy
from tpcompile.runtime.format.placement import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard


class Linearity(enum.Enum):
    """In which way an elementwise op is linear in a partial-sum operand."""

    ADDITIVE = "additive"  # P + P = P (two partials)
    SCALING = "scaling"  # P * R, P / R = P (one partial, scaled by replicated factors)
    UNARY = "unary"  # f(P) = P for a linear f of one operand
    NONE = "none"  # a partial operand is reduced first


FAMILIES: dict[Linearity, tuple[str, ...]] = {
    Linearity.ADDITIVE: ("add", "sub", "add_", "sub_"),
    Linearity.SCALING: ("mul", "mul_", "div", "div_", "true_divide"),
    Linearity.UNARY: ("neg", "dropout"),
    Linearity.NONE: (
        "abs",
        "acos",
        "asin",
        "atan",
        "bitwise_and",
        "bitwise_not",
        "bitwise_or",
        "bitwise_xor",
        "ceil",
        "clamp",
        "clamp_min",
        "clamp_max",
        "cos",
        "cosh",
        "elu",
        "eq",
        "erf",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "ge",
        "gelu",
        "gt",
        "hardtanh",
        "isinf",
        "isnan",
        "le",
        "leaky_relu",
        "log",
        "log1p",
        "log2",
        "logical_and",
        "logical_not",
        "logical_or",
        "lt",
        "masked_fill",
        "maximum",
        "minimum",
        "mish",
        "ne",
        "pow",
        "reciprocal",
        "relu",
        "round",
        "rsqrt",
        "sigmoid",
        "sign",
        "silu",
        "sin",
        "sinh",
        "softplus",
        "sqrt",
        "square",
        "tanh",
        "where",
        "to",
        "_to_copy",
        "type_as",
        "fmod",
        "remainder",
        "floor_divide",
        "relu_",
        "silu_",
        "gelu_",
        "masked_fill_",
        "clamp_",
        "lerp",
        "hardswish",
        "hardsigmoid",
        "nan_to_num",
        "float_power",
        "logical_xor",
        "sigmoid_",
        "tanh_",
        "erfinv",
        "trunc",
        "native_dropout",
    ),
}
_DIVISIONS = (aten.div, aten.div_, aten.true_divide)


def _partial_ok(kind: Linearity, node: fx.Node, ins: list[fx.Node], pls: dict[fx.Node, Placement]) -> bool:
    partial = [a for a in ins if isinstance(pls[a], Partial)]
    scalars = [a for a in node.args if isinstance(a, numbers.Number) and not isinstance(a, bool)]
    if kind is Linearity.ADDITIVE:
        return len(partial) == len(ins) and len(ins) == 2 and not scalars
    if kind is Linearity.SCALING:
        if len(partial) != 1 or (packet(node) in _DIVISIONS and partial[0] is not node.args[0]):
            return False
        return all(isinstance(pls[a], Replicate) for a in ins if a is not partial[0])
    return kind is Linearity.UNARY and len(ins) == 1


def pointwise_strategy(ctx: RuleContext, node: fx.Node, kind: Linearity) -> Strategy:
    """Broadcasting elementwise: the first shard decides, replicated operands are sliced to it (unless they
    broadcast along it); a partial survives only where ``kind`` is linear in it."""
    ins = tensor_inputs(ctx, node)
    pls = {a: concrete(ctx.placement(a)) for a in ins}
    if kind is not Linearity.ADDITIVE:  # a partial operand already reduced for another consumer: reuse it
        pls = {
            a: REPLICATE if isinstance(p, Partial) and ctx.reduced_already(a) else p for a, p in pls.items()
        }
    if any(isinstance(p, Partial) for p in pls.values()):
        if _partial_ok(kind, node, ins, pls):
            return Strategy(dict(pls), PARTIAL)
        pls = {a: (REPLICATE if isinstance(p, Partial) else p) for a, p in pls.items()}
    out_nd = len(shape_of(node)) if ctx.is_tensor(node) else max(len(shape_of(a)) for a in ins)
    target: Shard | None = None
    for a in ins:
        p = pls[a]
        if isinstance(p, Shard):
            target = p.with_dim(p.dim + out_nd - len(shape_of(a)))
            break
    if target is None:
        return Strategy(dict.fromkeys(ins, REPLICATE), REPLICATE)
    demands: dict[fx.Node, Placement] = {}
    for a in ins:
        shape = shape_of(a)
        d = target.dim - (out_nd - len(shape))
        if d >= 0 and pls[a] == target.with_dim(d):
            demands[a] = pls[a]  # already split this way (one KV head on every rank: a size-1 dim)
        else:
            demands[a] = REPLICATE if d < 0 or shape[d] == 1 else target.with_dim(d)
    return Strategy(demands, target)


def _family_rule(kind: Linearity) -> None:
    def rule(ctx: RuleContext, node: fx.Node) -> Strategy:
        return pointwise_strategy(ctx, node, kind)

    rule.__qualname__ = f"pointwise[{kind.value}]"
    register(*aten_ops(*FAMILIES[kind]))(rule)


for _kind in Linearity:
    _family_rule(_kind)


@register(aten.tril, aten.triu)
def triangular(ctx: RuleContext, node: fx.Node) -> Strategy:
    """The diagonal offset depends on global indices of the last two dims: those must be whole."""
    s = pointwise_strategy(ctx, node, Linearity.NONE)
    if isinstance(s.out, Shard) and s.out.dim >= len(shape_of(node)) - 2:
        return Strategy(dict.fromkeys(s.demands, REPLICATE), REPLICATE)
    return s


@register(aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like)
def like_factory(ctx: RuleContext, node: fx.Node) -> Strategy:
    """A new tensor shaped like its input: sharded like it, replicated when the input is partial."""
    src = node.args[0]
    p = concrete(ctx.placement(src))
    if isinstance(p, Shard):
        return Strategy({src: p}, p)
    return Strategy({}, REPLICATE)
