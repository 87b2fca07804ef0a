"""Placement propagation: give every node of an ATen graph a placement on the ``tp`` ranks.

Invariant: after ``propagate`` every tensor-valued node has a placement (Replicate, Shard or Partial), every
parameter and buffer has the placement its shard is stored in, and for every use of a tensor whose placement
differs from what its consumer's rule demands there is exactly one recorded redistribution (producer,
placement) -> placement. User outputs are demanded Replicate. Rules live in ``tpcompile.passes.ops``; an op
with no rule gets replicated inputs and a warning naming the op and its source line.

Parameters and buffers start *free*: the first consumer that demands a placement fixes it (slicing a stored
weight costs nothing at run time). A free tensor seen through views (``t``, ``permute``, ``unsqueeze``,
``view``/``reshape``, ``expand``, ``slice`` ...) stays free; a demand on the view is translated back to the
root through the view's dims (see ``FreeView``). Products and lookups of a free weight beside a replicated
activation record themselves as plan sites (``Propagation.sites``) for the planner. A stored
tensor read only through disjoint slices of one dim (a fused projection after ``split_fused_projections``)
is fixed piece by piece: each slice is a *window* whose placement is chosen by its own consumer, and the
root is stored as ``Pieces``.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.fx as fx

from tpcompile.passes.ops import fallback_rule, find_rule
from tpcompile.passes.rule_api import (
    FreeView,
    Propagation,
    Redistribution,
    RuleContext,
    Strategy,
    resolve_view,
    scale_shard,
    shape_of,
    source_line,
)
from tpcompile.plan.spec import ShardingPlan, Style
from tpcompile.runtime.format.placement import (
    PARTIAL,
    REPLICATE,
    Partial,
    Pieces,
    Placement,
    Replicate,
    Shard,
)


def propagate(
    gm: fx.GraphModule,
    tp: int,
    plan: ShardingPlan,
    names: dict[fx.Node, str],
    user_inputs: set[fx.Node],
    sharded_outputs: bool = False,
    weights: set[fx.Node] | None = None,
) -> Propagation:
    """Run every node's rule in topological order; see the module docstring for the invariant.

    With ``sharded_outputs`` an output that is sharded on its last dim stays sharded (the logits of a
    vocabulary-parallel lm_head: the runtime takes a distributed argmax instead of gathering them).
    ``weights``: the stored tensors products may offer as plan sites (default: every stored tensor)."""
    prop = Propagation(tp=tp)
    ctx = RuleContext(tp, plan, names, prop, weights)
    for node in gm.graph.nodes:
        ctx.current = node
        if node.op == "placeholder":
            if node in user_inputs or not ctx.is_tensor(node):
                prop.placements[node] = REPLICATE if ctx.is_tensor(node) else None
            else:
                prop.placements[node] = FreeView.of(node, len(shape_of(node)))
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
            resolved = resolve_view(pl, fixed)
            if resolved is None:
                ctx.current = node
                ctx.refuse(f"{node.name} views {names[pl.root]} in a way its split {fixed} cannot follow")
            prop.placements[node] = resolved or REPLICATE
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
            have = _fix_root(ctx, have, want, strategy.styles.get(producer))
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


def _root_placement(ctx: RuleContext, view: FreeView, want: Placement) -> Placement:
    """The stored placement that gives ``view`` the placement ``want``, or Replicate when none does: a
    shard of a view dim that shows a root dim (at a scale that keeps every size whole), or a partial."""
    if isinstance(want, Shard) and ctx.shardable(view, want.dim):
        vd = view.dims[want.dim]
        assert vd is not None
        if view.window is not None and vd.root != view.window[0]:
            return REPLICATE  # a piece is split along the dim it was cut from, or kept whole
        return scale_shard(want, vd.root, Fraction(vd.scale)) or REPLICATE
    if isinstance(want, Partial):
        return PARTIAL
    return REPLICATE


def _fix_root(ctx: RuleContext, view: FreeView, want: Placement, style: Style | None) -> Placement:
    """Choose the stored placement of a free tensor (or of its piece) from a demand on a view of it, in the
    role ``style``; return the view's placement."""
    got = _root_placement(ctx, view, want)
    if view.window is not None:
        ctx.prop.pieces.setdefault(view.root, {})[view.window] = got
        if style is not None:
            ctx.prop.piece_styles.setdefault(view.root, {})[view.window] = style
    else:
        ctx.prop.roots[view.root] = got
        if style is not None and not isinstance(got, Replicate):
            ctx.prop.styles[view.root] = style
    return want if not isinstance(got, Replicate) else REPLICATE
