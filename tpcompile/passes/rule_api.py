"""The rule API: what an op rule reads, what it returns, and what its lowering may emit.

Invariant: a rule is a function ``(RuleContext, node) -> Strategy`` that reads placements only through the
context and records only through the context's methods (``forbid``, ``refuse``, ``hint_unit``,
``offer_site``); the placements it demands and returns describe a local computation whose combination over
the ranks equals the global op. Its lowering (when the local op differs from the global one) emits, through
a :class:`LoweringBuilder`, exactly that local computation on one rank.

Stored tensors (parameters, buffers, constants) start *free*: a :class:`FreeView` is a stored tensor, or a
view of one, whose placement is not chosen yet. Views are data: each dimension of the view records which
root dimension it shows and at what scale, so a demand on the view (``S(1)`` of ``W.T`` or of
``W.view(1, D, H * K)``) translates back to the stored tensor (``S(0)``, or ``S(1)`` in heads).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple, Protocol

import torch
import torch.fx as fx

from tpcompile.passes.graph_queries import shape_of
from tpcompile.plan.spec import ParamDecision, ShardingPlan, Style
from tpcompile.runtime.format.placement import (
    REPLICATE,
    Partial,
    Pieces,
    Placement,
    Replicate,
    RootPlacement,
    Shard,
    balanced_split,
)


class ViewDim(NamedTuple):
    """Dimension ``root`` of the stored tensor, seen at ``scale``: ``n`` rows of the view are ``n * scale``
    rows of the root (a merged ``[H, K] -> H*K`` dim shows root dim H at scale 1/K)."""

    root: int
    scale: Fraction = Fraction(1)


@dataclass(frozen=True)
class FreeView:
    """A stored tensor, or a view of one, whose placement is not chosen yet.

    ``dims[i]`` is what dimension ``i`` of this view shows of the root, or None when the view cannot carry
    a shard there (a new unsqueezed dim, a broadcast, the inner part of a merged dim). ``window``
    ``(root_dim, lo, hi)``: the view reads only that piece of the root, whose placement is chosen separately
    from the other pieces (see ``Pieces``).
    """

    root: fx.Node
    dims: tuple[ViewDim | None, ...]
    window: tuple[int, int, int] | None = None

    @staticmethod
    def of(root: fx.Node, ndim: int) -> FreeView:
        return FreeView(root, tuple(ViewDim(d) for d in range(ndim)))

    def with_dims(self, dims: tuple[ViewDim | None, ...]) -> FreeView:
        return FreeView(self.root, dims, self.window)

    @property
    def is_identity(self) -> bool:
        return self.dims == tuple(ViewDim(d) for d in range(len(self.dims)))

    def view_dim(self, root_dim: int) -> int | None:
        """The dimension of this view that shows ``root_dim`` (None when none does)."""
        for i, vd in enumerate(self.dims):
            if vd is not None and vd.root == root_dim:
                return i
        return None


AnyPlacement = Placement | FreeView
NodeOut = Placement | FreeView | tuple[Placement | None, ...] | None


class LoweringBuilder(Protocol):
    """What a lowering callback may do: emit calls into rank ``rank``'s graph and read final placements."""

    rank: int
    tp: int

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node: ...

    def placement(self, node: fx.Node) -> NodeOut: ...

    def stored(self, node: fx.Node) -> RootPlacement: ...


class Lowering(Protocol):
    """Emit the rank-local form of ``node`` given its already-lowered ``args``/``kwargs``."""

    def __call__(
        self, b: LoweringBuilder, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> fx.Node: ...


@dataclass
class Strategy:
    """What a rule decides for one node: the placement each tensor input must have, the output's, the local
    form when it differs from the global op, and the role (style) in which a free stored input is split."""

    demands: dict[fx.Node, Placement]
    out: NodeOut
    lower: Lowering | None = None
    styles: Mapping[fx.Node, Style] = field(default_factory=dict)


class SiteKind(enum.Enum):
    """How a plan site uses its stored tensor: as the weight of a product, or as a table it looks up."""

    PRODUCT = "product"
    LOOKUP = "lookup"


@dataclass(frozen=True)
class PlanSite:
    """A product (``linear``, ``mm``, ``matmul``, ``bmm``, ``addmm``, ``einsum``) or lookup (``embedding``,
    ``E[idx]``, ``index_select``) reading a free stored tensor beside a replicated activation: a place where
    the plan may start a column-parallel chain (or a vocabulary-parallel table) by splitting root dim
    ``dim`` (``features`` long) of ``weight``."""

    node: fx.Node
    weight: fx.Node
    activation: fx.Node
    dim: int
    features: int
    kind: SiteKind
    key: str  # the plan's name for the weight: the stored tensor's, or its piece's
    window: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Redistribution:
    producer: fx.Node
    src: Placement
    dst: Placement

    @property
    def collective(self) -> str | None:
        """The collective this needs, or None when it is a local operation (slice, zero-fill)."""
        if isinstance(self.src, Partial):
            return "all_reduce"
        if isinstance(self.src, Shard):
            return "all_gather"
        return None


@dataclass
class Propagation:
    """The result: placements of nodes and of stored tensors, and the redistributions to insert."""

    tp: int
    placements: dict[fx.Node, NodeOut] = field(default_factory=dict)
    roots: dict[fx.Node, RootPlacement] = field(default_factory=dict)
    pieces: dict[fx.Node, dict[tuple[int, int, int], Placement]] = field(default_factory=dict)
    styles: dict[fx.Node, Style] = field(default_factory=dict)
    piece_styles: dict[fx.Node, dict[tuple[int, int, int], Style]] = field(default_factory=dict)
    redistributions: dict[tuple[fx.Node, fx.Node], Redistribution] = field(default_factory=dict)
    lowerings: dict[fx.Node, Lowering] = field(default_factory=dict)
    sites: list[PlanSite] = field(default_factory=list)
    unit_hints: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fallback_ops: set[str] = field(default_factory=set)
    refusals: list[str] = field(default_factory=list)

    def collectives(self) -> list[tuple[Redistribution, list[fx.Node]]]:
        """Unique collectives (one per producer and target placement) with the consumers that need each."""
        seen: dict[tuple[fx.Node, Placement], tuple[Redistribution, list[fx.Node]]] = {}
        for (consumer, _), red in self.redistributions.items():
            if red.collective is None:
                continue
            key = (red.producer, red.dst)
            seen.setdefault(key, (red, []))[1].append(consumer)
        return list(seen.values())

    def fixed(self, view: FreeView) -> Placement | None:
        """The stored placement (in root dims) behind a free view, once chosen: its piece's for a window."""
        if view.window is not None:
            return self.pieces.get(view.root, {}).get(view.window)
        root = self.roots.get(view.root)
        if isinstance(root, Pieces):
            raise AssertionError(f"{view.root.name} is stored in pieces but read whole")
        return root

    def placement(self, node: fx.Node) -> Placement:
        pl = self.placements.get(node)
        if isinstance(pl, Replicate | Partial | Shard):
            return pl
        raise KeyError(f"node {node.name} has no single placement")

    def style(self, root: fx.Node) -> Style:
        """The role in which stored tensor ``root`` was split (``replicate`` when it was not)."""
        pl = self.roots.get(root)
        if isinstance(pl, Pieces):
            parts = {
                self.piece_styles.get(root, {}).get((pl.dim, lo, hi), Style.SHARDED)
                for lo, hi, p in pl.parts
                if not isinstance(p, Replicate)
            }
            if not parts:
                return Style.REPLICATE
            return Style.FUSED_COLWISE if parts == {Style.COLWISE} else Style.FUSED
        if isinstance(pl, Partial):
            return Style.PARTIAL
        if isinstance(pl, Shard):
            return self.styles.get(root, Style.SHARDED)
        return Style.REPLICATE


def piece_key(name: str, window: tuple[int, int, int]) -> str:
    """The plan's name for one piece of a stored tensor: ``w[96:128]``, ``w[:,96:128]`` on dim 1."""
    dim, lo, hi = window
    return f"{name}[{':,' * dim}{lo}:{hi}]"


@functools.lru_cache(maxsize=4096)
def scale_shard(pl: Shard, dim: int, scale: Fraction) -> Shard | None:
    """``pl`` moved to ``dim`` with every size and start multiplied by ``scale``; None unless exact."""
    values = [Fraction(v) * scale for v in (*pl.sizes, *(pl.starts or ()))]
    if any(v.denominator != 1 for v in values):
        return None
    ints = [int(v) for v in values]
    starts = tuple(ints[len(pl.sizes) :]) if pl.starts is not None else None
    return Shard(dim, tuple(ints[: len(pl.sizes)]), starts)


def resolve_view(view: FreeView, root: Placement) -> Placement | None:
    """The placement of ``view`` once its root is stored as ``root``; None when the view cannot show it."""
    if not isinstance(root, Shard):
        return root
    dim = view.view_dim(root.dim)
    if dim is None:
        return None
    vd = view.dims[dim]
    assert vd is not None
    return scale_shard(root, dim, 1 / vd.scale)


def source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else "(no source line recorded)"


class RuleContext:
    """What a rule may ask about the graph while propagation runs, and what it may record."""

    def __init__(
        self,
        tp: int,
        plan: ShardingPlan,
        names: dict[fx.Node, str],
        prop: Propagation,
        weights: set[fx.Node] | None = None,
    ) -> None:
        self.tp = tp
        self.plan = plan
        self.names = names
        self.prop = prop
        self.weights = set(names) if weights is None else weights
        self.forbidden: dict[fx.Node, set[int]] = {}
        self.current: fx.Node | None = None

    # -- queries -------------------------------------------------------------------------------------------
    def reduced_already(self, node: fx.Node) -> bool:
        """An earlier consumer already asked for ``node`` replicated: the all-reduce exists, reuse it."""
        return any(
            r.producer is node and isinstance(r.dst, Replicate) for r in self.prop.redistributions.values()
        )

    def placement(self, node: Any) -> AnyPlacement | None:
        """Placement of a tensor input, resolving free views whose root is already fixed."""
        if not isinstance(node, fx.Node):
            return None
        pl = self.prop.placements.get(node)
        if isinstance(pl, FreeView):
            root = self.prop.fixed(pl)
            if root is None:
                return pl
            return resolve_view(pl, root) or REPLICATE  # unrepresentable views are refused at the end
        if isinstance(pl, tuple):
            return None
        return pl

    def is_tensor(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)

    def decision(self, pl: AnyPlacement | None) -> ParamDecision | None:
        """The plan's decision for a free stored tensor (or for its piece, falling back to the tensor's)."""
        if not isinstance(pl, FreeView):
            return None
        name = self.names.get(pl.root, "")
        if pl.window is not None and piece_key(name, pl.window) in self.plan.decisions:
            return self.plan.decisions[piece_key(name, pl.window)]
        return self.plan.decisions.get(name)

    def planned(self, view: AnyPlacement | None, roles: Mapping[Style, int]) -> Placement | None:
        """The placement the plan gives a free stored tensor seen as ``view`` by this op: a decision with a
        root dim splits the view dim that shows it; one without (``--plan`` styles) splits the view dim
        ``roles`` names for its style. None when the plan says nothing that fits this view."""
        decision = self.decision(view)
        if decision is None or not isinstance(view, FreeView):
            return None
        if decision.style is Style.REPLICATE:
            return REPLICATE
        dim = view.view_dim(decision.dim) if decision.dim is not None else roles.get(decision.style)
        if dim is None or not self.shardable(view, dim):
            return None
        vd = view.dims[dim]
        assert vd is not None
        if decision.sizes is not None:
            root = Shard(vd.root, decision.sizes, decision.starts)
        else:
            root = Shard(vd.root, balanced_split(root_length(view, vd.root), self.tp))
        return scale_shard(root, dim, 1 / vd.scale)

    def shardable(self, view: FreeView, dim: int) -> bool:
        """Can the free tensor behind ``view`` be stored sharded so that ``view`` is sharded on ``dim``?"""
        vd = view.dims[dim]
        return vd is not None and vd.root not in self.forbidden.get(view.root, set())

    # -- recording -----------------------------------------------------------------------------------------
    def offer_site(self, weight: AnyPlacement | None, activation: Any, view_dim: int, kind: SiteKind) -> None:
        """Record the current node as a plan site when ``weight`` is a free stored weight (not a buffer
        written in place), ``activation`` is replicated and view dim ``view_dim`` shows a root dim."""
        node = self.current
        if node is None or not isinstance(weight, FreeView) or weight.root not in self.weights:
            return
        if not isinstance(self.placement(activation), Replicate) or not isinstance(activation, fx.Node):
            return
        vd = weight.dims[view_dim] if view_dim < len(weight.dims) else None
        if vd is None or (weight.window is not None and weight.window[0] != vd.root):
            return
        name = self.names[weight.root]
        key = piece_key(name, weight.window) if weight.window is not None else name
        features = root_length(weight, vd.root)
        self.prop.sites.append(
            PlanSite(node, weight.root, activation, vd.root, features, kind, key, weight.window)
        )

    def refuse(self, message: str) -> None:
        """This placement cannot be computed correctly: the plan that led here must not be used."""
        where = source_line(self.current) if self.current is not None else ""
        self.prop.refusals.append(f"{message} (at {where})")

    def forbid(self, root: fx.Node, dim: int) -> None:
        self.forbidden.setdefault(root, set()).add(dim)

    def hint_unit(self, multiple: int) -> None:
        """Record that a shard would have survived here if its sizes were multiples of ``multiple``."""
        self.prop.unit_hints.append(multiple)


def root_length(view: FreeView, root_dim: int) -> int:
    """The length of root dim ``root_dim`` that ``view`` reads (its window's, when the window is on it)."""
    if view.window is not None and view.window[0] == root_dim:
        return view.window[2] - view.window[1]
    return int(shape_of(view.root)[root_dim])
