"""The op-rule registry: one entry per op family, each a function ``(ctx, node) -> Strategy``.

Invariant: a rule never returns a strategy whose local computation differs from the global one; when it
cannot keep its inputs' placements it demands Replicate (correct, maybe slow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from tpcompile.passes.placement import REPLICATE
from tpcompile.passes.propagate import RuleContext, Strategy

Rule = Callable[[RuleContext, fx.Node], Strategy]
_RULES: dict[Any, Rule] = {}


def register(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a rule for op overload packets (``aten.view``), overloads or plain callables."""

    def wrap(fn: Rule) -> Rule:
        for t in targets:
            if t is not None:
                _RULES[t] = fn
        return fn

    return wrap


def find_rule(target: Any) -> Rule | None:
    _load_rules()
    if target in _RULES:
        return _RULES[target]
    packet = getattr(target, "overloadpacket", None)
    return _RULES.get(packet) if packet is not None else None


def registered_ops() -> list[str]:
    _load_rules()
    return sorted({str(t) for t in _RULES})


def fallback_rule(ctx: RuleContext, node: fx.Node) -> Strategy:
    """No rule: every tensor input is made whole (all-gather / all-reduce), the output is replicated."""
    from tpcompile.passes.ops.common import tensor_inputs

    return Strategy({a: REPLICATE for a in tensor_inputs(ctx, node)}, REPLICATE)


_loaded = False


def _load_rules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from tpcompile.passes.ops import (  # noqa: F401  (importing registers)
        attention,
        einsum,
        indexing,
        linear,
        misc,
        pointwise,
        reductions,
        views,
    )
