"""The op-rule table: one rule per op, keyed by its overload packet.

Invariant: every op has at most one rule, and it is named by the op itself (``aten.view``, never a string
or a substring of one): registering an op twice, registering an overload instead of its packet, or naming
an op this torch does not have raises at import, so a table that loads is a table without silent
overrides. ``find_rule`` looks a node's target up by its packet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.rule_api import RuleContext, Strategy

Rule = Callable[[RuleContext, fx.Node], Strategy]
aten = torch.ops.aten

_RULES: dict[Any, Rule] = {}


class RegistryError(Exception):
    """The rule table is inconsistent: an op registered twice, an overload, or an unknown op name."""


def aten_ops(*names: str) -> tuple[torch._ops.OpOverloadPacket, ...]:
    """The ``aten`` packets called ``names``; RegistryError for a name this torch does not have."""
    packets = []
    for name in names:
        try:
            packets.append(getattr(aten, name))
        except AttributeError:
            raise RegistryError(f"torch has no op aten.{name}; fix the rule table") from None
    return tuple(packets)


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Register ``rule`` for op overload packets (``aten.view``) or plain callables (``operator.getitem``)."""

    def wrap(rule: Rule) -> Rule:
        for op in ops:
            if isinstance(op, torch._ops.OpOverload):
                raise RegistryError(f"register the packet {op.overloadpacket}, not the overload {op}")
            if op in _RULES:
                held = _RULES[op]
                raise RegistryError(
                    f"{op} already has the rule {held.__module__}.{held.__qualname__}; "
                    f"{rule.__module__}.{rule.__qualname__} would silently replace it"
                )
            _RULES[op] = rule
        return rule

    return wrap


def find_rule(target: Any) -> Rule | None:
    """The rule for a call node's target (an overload is looked up by its packet), or None."""
    return _RULES.get(getattr(target, "overloadpacket", target))


def rule_table() -> dict[str, str]:
    """Every registered op -> the qualified name of its rule (for tests and ``--debug`` listings)."""
    return {str(op): f"{rule.__module__}.{rule.__qualname__}" for op, rule in _RULES.items()}
