"""The op rules, one module per op family; importing this package fills the table in ``registry``.

Invariant: a rule never returns a strategy whose local computation differs from the global one; when it
cannot keep its inputs' placements it demands Replicate (correct, maybe slow). An op with no rule gets
``fallback_rule``: every tensor input made whole, the output replicated.
"""

from __future__ import annotations

import torch.fx as fx

from tpcompile.passes.ops import (  # noqa: F401  (importing a family registers its rules)
    attention,
    einsum,
    indexing,
    linear,
    misc,
    pointwise,
    reductions,
    views,
)
from tpcompile.passes.ops.common import replicate_all
from tpcompile.passes.ops.registry import find_rule, rule_table
from tpcompile.passes.rule_api import RuleContext, Strategy

__all__ = ["fallback_rule", "find_rule", "rule_table"]


def fallback_rule(ctx: RuleContext, node: fx.Node) -> Strategy:
    """No rule: every tensor input is made whole (all-gather / all-reduce), the output is replicated."""
    return replicate_all(ctx, node)
