"""Placement propagation: give every node of an ATen graph a placement on the ``tp`` ranks.

Invariant: after ``propagate`` every tensor-valued node has a placement (Replicate, Shard or Partial), every
parameter and buffer has the placement its shard is stored in, and for every use of a tensor whose placement
differs from what its consumer's rule demands there is exactly one recorded redistribution (producer,
placement) -> placement. User outputs are demanded Replicate. Rules live in ``tpcompile.passes.ops``; an op
with no rule gets replicated inputs and a warning naming the op and its source line.

Parameters and buffers start *free*: the first consumer that demands a placement fixes it (slicing a stored
weight costs nothing at run time). A free tensor seen through a dimension-permuting view (``t``, ``permute``,
``unsqueeze``, ``slice`` ...) stays free; a demand on the view is translated back to the root. A stored
tensor read only through disjoint slices of one dim (a fused projection after ``split_fused_projections``)
is fixed piece by piece: each slice is a *window* whose placement is chosen by its own consumer, and the
root is stored as ``Pieces``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Pieces,
    Placement,
    Replicate,
    RootPlacement,
    Shard,
)
from tpcompile.plan.spec import ParamDecision, ShardingPlan


@dataclass(frozen=True)
class FreeView:
    """A parameter/buffer, or a view of one, whose placement is not chosen yet.

    ``dims[i]`` is the root dimension that dimension ``i`` of this view is, or None when the view cannot carry
    a shard on it (a new unsqueezed dim). ``window`` ``(root_dim, lo, hi)``: the view reads only that piece
    of the root, whose placement is chosen separately from the other pieces (see ``Pieces``).
    """

    root: fx.Node
    dims: tuple[int | None, ...]
    window: tuple[int, int, int] | None = None

    def with_dims(self, dims: tuple[int | None, ...]) -> FreeView:
        return FreeView(self.root, dims, self.window)


AnyPlacement = Placement | FreeView
NodeOut = Placement | FreeView | tuple[Placement | None, ...] | None


class LowerFn:
    """Marker type for rule lowering callbacks (see ``tpcompile.passes.lower_rank``)."""


@dataclass
class Strategy:
    """What a rule decides for one node: the placement each tensor input must have, and the output's."""

    demands: dict[fx.Node, Placement]
    out: NodeOut
    lower: Callable[..., Any] | None = None


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
    redistributions: dict[tuple[fx.Node, fx.Node], Redistribution] = field(default_factory=dict)
    lowerings: dict[fx.Node, Callable[..., Any]] = field(default_factory=dict)
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


class RuleContext:
    """What a rule may ask about the graph while propagation runs."""

    def __init__(self, tp: int, plan: ShardingPlan, names: dict[fx.Node, str], prop: Propagation) -> None:
        self.tp = tp
        self.plan = plan
        self.names = names
        self.prop = prop
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
            return pl if root is None else resolve_view(pl, root)
        if isinstance(pl, tuple):
            return None
        return pl

    def is_tensor(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)

    def decision(self, pl: AnyPlacement | None) -> ParamDecision | None:
        """The plan's decision for a free stored tensor (or for its piece, falling back to the tensor's)."""
        if isinstance(pl, FreeView) and pl.dims == tuple(range(len(pl.dims))):
            name = self.names.get(pl.root, "")
            if pl.window is not None and piece_key(name, pl.window) in self.plan.decisions:
                return self.plan.decisions[piece_key(name, pl.window)]
            return self.plan.decisions.get(name)
        return None

    def shardable(self, view: FreeView, dim: int) -> bool:
        """Can the free tensor behind ``view`` be stored sharded so that ``view`` is sharded on ``dim``?"""
        rdim = view.dims[dim]
        return rdim is not None and rdim not in self.forbidden.get(view.root, set())

    def refuse(self, message: str) -> None:
        """This placement cannot be computed correctly: the plan that led here must not be used."""
        where = source_line(self.current) if self.current is not None else ""
        self.prop.refusals.append(f"{message} (at {where})")

    def forbid(self, root: fx.Node, dim: int) -> None:
        self.forbidden.setdefault(root, set()).add(dim)

    def hint_unit(self, multiple: int) -> None:
        """Record that a shard would have survived here if its sizes were multiples of ``multiple``."""
        self.prop.unit_hints.append(multiple)


def piece_key(name: str, window: tuple[int, int, int]) -> str:
    """The plan's name for one piece of a stored tensor: ``w[96:128]``, ``w[:,96:128]`` on dim 1."""
    dim, lo, hi = window
    return f"{name}[{':,' * dim}{lo}:{hi}]"


def resolve_view(view: FreeView, root: Placement) -> Placement:
    if isinstance(root, Shard):
        if root.dim in view.dims:
            return root.with_dim(view.dims.index(root.dim))
        return REPLICATE  # unreachable by construction: a dropped dim is forbidden to shard
    return root


def shape_of(node: Any) -> tuple[Any, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"{node} is not a tensor")
    return tuple(int(s) if isinstance(s, int) else s for s in val.shape)


def source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return lines[-1] if lines else "(no source line recorded)"


def propagate(
    gm: fx.GraphModule,
    tp: int,
    plan: ShardingPlan,
    names: dict[fx.Node, str],
    user_inputs: set[fx.Node],
    sharded_outputs: bool = False,
) -> Propagation:
    """Run every node's rule in topological order; see the module docstring for the invariant.

    With ``sharded_outputs`` an output that is sharded on its last dim stays sharded (the logits of a
    vocabulary-parallel lm_head: the runtime takes a distributed argmax instead of gathering them)."""
    from tpcompile.passes.ops import fallback_rule, find_rule

    prop = Propagation(tp=tp)
    ctx = RuleContext(tp, plan, names, prop)
    for node in gm.graph.nodes:
        ctx.current = node
        if node.op == "placeholder":
            if node in user_inputs or not ctx.is_tensor(node):
                prop.placements[node] = REPLICATE if ctx.is_tensor(node) else None
            else:
                prop.placements[node] = FreeView(node, tuple(range(len(shape_of(node)))))
            continue
        if node.op == "get_attr":
            prop.placements[node] = REPLICATE
            continue
        if node.op == "output":
            outs = [a for a in torch.utils._pytree.tree_leaves(node.args) if ctx.is_tensor(a)]
            _apply(ctx, node, Strategy({a: _output_placement(ctx, a, sharded_outputs) for a in outs}, None))
            continue
        rule = find_rule(node.target)
        if rule is None:
            strategy = fallback_rule(ctx, node)
            op = str(node.target)
            if op not in prop.fallback_ops and _has_nonreplicated_input(ctx, node):
                prop.fallback_ops.add(op)
                prop.warnings.append(f"no sharding rule for {op}: inputs replicated at {source_line(node)}")
        else:
            strategy = rule(ctx, node)
        _apply(ctx, node, strategy)
    for pl in list(prop.placements.values()):
        if isinstance(pl, FreeView) and pl.window is not None:
            prop.pieces.setdefault(pl.root, {}).setdefault(pl.window, REPLICATE)
        elif isinstance(pl, FreeView) and pl.root not in prop.roots:
            prop.roots[pl.root] = REPLICATE
    for root, parts in prop.pieces.items():
        prop.roots[root] = _assemble_pieces(root, parts)
    for node in list(prop.placements):
        pl = prop.placements[node]
        if isinstance(pl, FreeView) and pl.window is None and isinstance(prop.roots[pl.root], Pieces):
            prop.placements[node] = None  # the stored tensor itself: no single placement (see Pieces)
        elif isinstance(pl, FreeView):
            fixed = prop.fixed(pl)
            assert fixed is not None
            prop.placements[node] = resolve_view(pl, fixed)
    return prop


def _assemble_pieces(root: fx.Node, parts: dict[tuple[int, int, int], Placement]) -> Pieces:
    """The stored layout of a tensor read through disjoint windows; parts nobody reads stay whole."""
    dims = {w[0] for w in parts}
    assert len(dims) == 1, f"{root.name}: windows on several dims"
    dim = dims.pop()
    size = int(shape_of(root)[dim])
    out: list[tuple[int, int, Placement]] = []
    at = 0
    for (_, lo, hi), pl in sorted(parts.items()):
        if lo > at:
            out.append((at, lo, REPLICATE))
        out.append((lo, hi, pl))
        at = hi
    if at < size:
        out.append((at, size, REPLICATE))
    return Pieces(dim, tuple(out))


def _output_placement(ctx: RuleContext, out: fx.Node, sharded_outputs: bool) -> Placement:
    pl = ctx.placement(out)
    last = len(shape_of(out)) - 1
    if sharded_outputs and isinstance(pl, Shard) and pl.dim == last and not pl.overlapping:
        return pl
    return REPLICATE


def _has_nonreplicated_input(ctx: RuleContext, node: fx.Node) -> bool:
    return any(not isinstance(ctx.placement(a), Replicate | FreeView | None) for a in node.all_input_nodes)


def _apply(ctx: RuleContext, node: fx.Node, strategy: Strategy) -> None:
    prop = ctx.prop
    for producer, want in strategy.demands.items():
        have = ctx.placement(producer)
        if isinstance(have, FreeView):
            have = _fix_root(ctx, have, want)
        if have is None:
            continue
        if have != want:
            prop.redistributions[(node, producer)] = Redistribution(producer, have, want)
    if isinstance(strategy.out, Partial) and any(
        isinstance(w, Shard) and w.overlapping for w in strategy.demands.values()
    ):
        ctx.refuse(f"{node.target} would sum a shard whose slices overlap between ranks")
    prop.placements[node] = strategy.out
    if strategy.lower is not None:
        prop.lowerings[node] = strategy.lower


def _fix_root(ctx: RuleContext, view: FreeView, want: Placement) -> Placement:
    """Choose the stored placement of a free tensor from a demand on (a view of) it; return the view's."""
    root = view.root
    identity = view.dims == tuple(range(len(view.dims)))
    if view.window is not None:
        return _fix_piece(ctx, view, want, identity)
    if isinstance(want, Shard):
        rdim = view.dims[want.dim]
        if rdim is not None and rdim not in ctx.forbidden.get(root, set()):
            ctx.prop.roots[root] = want.with_dim(rdim)
            return want
    elif isinstance(want, Partial) and identity:
        ctx.prop.roots[root] = PARTIAL
        return want
    ctx.prop.roots[root] = REPLICATE
    return REPLICATE


def _fix_piece(ctx: RuleContext, view: FreeView, want: Placement, identity: bool) -> Placement:
    """Like ``_fix_root`` for one window: only a shard along the window's dim (or a partial) is kept."""
    assert view.window is not None
    wdim = view.window[0]
    got: Placement = REPLICATE
    if isinstance(want, Shard):
        rdim = view.dims[want.dim]
        if rdim == wdim and rdim not in ctx.forbidden.get(view.root, set()):
            got = want.with_dim(rdim)
    elif isinstance(want, Partial) and identity:
        got = PARTIAL
    ctx.prop.pieces.setdefault(view.root, {})[view.window] = got
    return want if got is not REPLICATE else REPLICATE
