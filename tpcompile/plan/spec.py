"""Sharding plans: which stored tensors are split, and how. A plan is data; the passes carry it out."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tpcompile.errors import UsageError

Style = Literal["colwise", "rowwise", "replicate", "expert"]  # expert: split dim 0 of stacked experts
STYLES: tuple[Style, ...] = ("colwise", "rowwise", "replicate")


@dataclass(frozen=True)
class ParamDecision:
    """``colwise``: the output features are split with ``sizes``; ``rowwise``: the input features are split;
    ``replicate``: every rank keeps the whole tensor. ``sizes`` None means "balanced, chosen by the pass";
    ``starts`` None means the slices follow each other (see ``Shard``)."""

    style: Style
    sizes: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None  # overlapping column slices (KV heads shared by several ranks)


@dataclass
class ShardingPlan:
    tp: int
    decisions: dict[str, ParamDecision] = field(default_factory=dict)

    def with_decisions(self, extra: dict[str, ParamDecision]) -> ShardingPlan:
        return ShardingPlan(self.tp, {**self.decisions, **extra})


@dataclass(frozen=True)
class PlanFile:
    """An explicit plan: glob on the parameter name -> style. The first matching pattern wins."""

    rules: tuple[tuple[str, Style], ...]

    def style_for(self, name: str) -> Style | None:
        for pattern, style in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return style
        return None


def load_plan_file(path: str | Path) -> PlanFile:
    """Read ``{"pattern": "colwise" | "rowwise" | "replicate", ...}`` from a JSON file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"plan file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"plan file {p} is not valid JSON: {err.msg} (line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"plan file {p} must hold a JSON object of pattern -> style")
    rules: list[tuple[str, Style]] = []
    for pattern, style in data.items():
        if style not in STYLES:
            raise UsageError(
                f"plan file {p}: {pattern!r} has style {style!r}; use one of {', '.join(STYLES)}"
            )
        rules.append((str(pattern), style))
    return PlanFile(tuple(rules))
