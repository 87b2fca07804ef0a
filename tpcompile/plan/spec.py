"""Sharding plans: which stored tensors are split, and how. A plan is data; the passes carry it out."""

from __future__ import annotations

import enum
import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tpcompile.errors import UsageError


class Style(str, enum.Enum):
    """How a stored tensor is split: the plan decides it, the op rules carry it out, the manifest records
    it (``parameters[].plan``)."""

    COLWISE = "colwise"  # output features split: starts a column-parallel chain
    ROWWISE = "rowwise"  # input features split: ends a chain in a partial sum
    VOCAB = "vocab"  # rows of a lookup table split: each rank looks up its ids, the sum completes it
    EXPERT = "expert"  # the expert dim of stacked expert weights split (--moe ep)
    PARTIAL = "partial"  # a row-parallel bias, stored on rank 0 only so that it is added once
    SHARDED = "sharded"  # split to follow its consumers (a KV cache by heads, a norm weight by features)
    FUSED_COLWISE = "fused-colwise"  # a fused projection stored as its column-parallel pieces
    FUSED = "fused"  # a fused projection stored as pieces split in different roles
    REPLICATE = "replicate"  # every rank holds the whole tensor

    def __str__(self) -> str:
        return self.value


#: The styles a ``--plan`` file may ask for.
PLAN_FILE_STYLES: tuple[Style, ...] = (Style.COLWISE, Style.ROWWISE, Style.REPLICATE)


@dataclass(frozen=True)
class ParamDecision:
    """Split stored tensor dim ``dim`` with ``sizes`` in role ``style``; ``replicate``: every rank keeps the
    whole tensor. ``dim`` None (a ``--plan`` style) means the dim the consuming op gives that role (a
    linear's output features for colwise, its input features for rowwise); ``sizes`` None means balanced;
    ``starts`` None means the slices follow each other (see ``Shard``)."""

    style: Style
    sizes: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None  # overlapping column slices (KV heads shared by several ranks)
    dim: int | None = None


@dataclass(frozen=True)
class ChainClass:
    """Sibling groups the search split that have one structure (the same site kinds and weight shapes):
    typically one group per layer of a repeated block. ``keys``: the plan names of their weights, in
    program order. Keeping a class whole is one of the candidates ``plan/weigh.py`` weighs."""

    keys: tuple[str, ...]

    @property
    def label(self) -> str:
        more = f" and {len(self.keys) - 1} more of its class" if len(self.keys) > 1 else ""
        return f"{self.keys[0]}{more}"


@dataclass(frozen=True)
class WeighedPlan:
    """A candidate plan of ``plan/weigh.py``: the chain classes it keeps whole (by label), its all-reduce and
    all-gather count per step, the decode speed the cost model predicts for it, and whether grouped units
    (query heads over KV heads) are split evenly rather than along whole groups."""

    kept_whole: tuple[str, ...]
    collectives: int
    decode_tokens_per_s: float
    chosen: bool = False
    balanced: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "kept_whole": list(self.kept_whole),
            "balanced": self.balanced,
            "collectives": self.collectives,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "chosen": self.chosen,
        }


@dataclass
class ShardingPlan:
    tp: int
    decisions: dict[str, ParamDecision] = field(default_factory=dict)
    #: weights a plan site could have split that stay replicated, with the reason (compile summary, explain)
    unsplit: dict[str, str] = field(default_factory=dict)
    #: those of them replicated only because tp is larger than their whole units allow: the most ranks each
    #: could be split over
    rank_limits: dict[str, int] = field(default_factory=dict)
    #: the split chains by structure (plan/auto.py), and the candidates weighed on a profile (plan/weigh.py)
    chain_classes: list[ChainClass] = field(default_factory=list)
    weighed: list[WeighedPlan] = field(default_factory=list)
    weighed_on: str | None = None  # the hardware profile's name

    def with_decisions(self, extra: dict[str, ParamDecision]) -> ShardingPlan:
        return ShardingPlan(self.tp, {**self.decisions, **extra}, dict(self.unsplit))


@dataclass(frozen=True)
class PlanFile:
    """An explicit plan: glob on the parameter name -> style. The first matching pattern wins.
    ``source`` (the file) only names it in messages."""

    rules: tuple[tuple[str, Style], ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple((p, Style(s)) for p, s in self.rules))

    def style_for(self, name: str) -> Style | None:
        for pattern, style in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return style
        return None

    def unused(self, names: Iterable[str]) -> list[str]:
        """One line for each pattern that decides no parameter among ``names`` (a typo would otherwise go
        unnoticed): it matches none, or only ones an earlier pattern decides. In the file's order."""
        names = list(names)
        matches = {p: [n for n in names if fnmatch.fnmatchcase(n, p)] for p, _ in self.rules}
        deciding = {next((p for p, _ in self.rules if n in matches[p]), None) for n in names}
        where = f"plan file {self.source}: " if self.source else ""
        why = {True: "only matches parameters an earlier pattern decides", False: "matches no parameter"}
        return [
            f"{where}pattern {pattern!r} {why[bool(matches[pattern])]}"
            for pattern, _ in self.rules
            if pattern not in deciding
        ]


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
    allowed = [s.value for s in PLAN_FILE_STYLES]
    for pattern, style in data.items():
        if style not in allowed:
            raise UsageError(
                f"plan file {p}: {pattern!r} has style {style!r}; use one of {', '.join(allowed)}"
            )
        rules.append((str(pattern), Style(style)))
    return PlanFile(tuple(rules), str(p))
