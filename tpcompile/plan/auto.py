"""Automatic plan selection from the graph's structure.

A *site* is a matrix product or embedding lookup whose weight is a stored tensor. Walking the sites in
program order, each one whose activation arrives replicated is tried as the start of a column-parallel
chain, together with its siblings (the sites reading the same activation: q/k/v, gate/up). Propagation is
the judge: the trial is kept when it adds at most one collective and no all-gather inside the program (the
chain ends in a row-parallel product whose partial sum is reduced once). The split unit comes from the
graph: when a reshape downstream needs shard sizes that are multiples of a head size, the trial is repeated
with that unit, so heads (and grouped-query KV groups) are never cut. A fused projection, once
``split_fused_projections`` has cut it into one product per piece, is one site per piece (reading a slice of
the stored weight), so q/k/v pieces are siblings like separate q/k/v projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from tpcompile.passes.ops.attention import kv_split
from tpcompile.passes.ops.indexing import slice_bounds
from tpcompile.passes.placement import Replicate, Shard, balanced_split
from tpcompile.passes.propagate import Propagation, piece_key, propagate, shape_of
from tpcompile.plan.experts import DEFAULT_MOE, expert_decisions, feature_classes, stacked_root
from tpcompile.plan.spec import ParamDecision, PlanFile, ShardingPlan

aten = torch.ops.aten
_VIEWS = (aten.t.default, aten.permute.default, aten.transpose.int, aten.detach.default, aten.alias.default)
MAX_UNIT_RETRIES = 4


@dataclass(frozen=True)
class Site:
    node: fx.Node
    weight: fx.Node  # the stored tensor's placeholder
    activation: fx.Node
    out_features: int
    key: str = ""  # the plan's name for the weight: the stored tensor's, or its piece's
    window: tuple[int, int, int] | None = None  # the piece of the weight this site reads


def _piece(value: object, names: dict[fx.Node, str]) -> tuple[fx.Node, tuple[int, int, int]] | None:
    """``(weight, window)`` when ``value`` is a constant slice of a stored 2-d tensor."""
    window = slice_bounds(value)
    if window is None or not isinstance(value, fx.Node):
        return None
    root = value.args[0]
    if not isinstance(root, fx.Node) or root not in names or len(shape_of(root)) != 2:
        return None
    return root, window


def _root(value: object, names: dict[fx.Node, str]) -> fx.Node | None:
    node = value
    while isinstance(node, fx.Node):
        if node in names:
            return node
        if node.op == "call_function" and node.target in _VIEWS:
            node = node.args[0]
            continue
        return None
    return None


def find_sites(gm: fx.GraphModule, names: dict[fx.Node, str]) -> list[Site]:
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        packet = getattr(node.target, "overloadpacket", None)
        site: Site | None = None
        if packet is aten.linear:
            w = _root(node.args[1], names)
            piece = _piece(node.args[1], names)
            if w is not None and w is node.args[1] and len(shape_of(w)) == 2:
                site = Site(node, w, node.args[0], int(shape_of(w)[0]))
            elif piece is not None and piece[1][0] == 0:
                site = Site(node, piece[0], node.args[0], piece[1][2] - piece[1][1], window=piece[1])
        elif packet is aten.embedding:
            w = _root(node.args[0], names)
            if w is not None and w is node.args[0]:
                site = Site(node, w, node.args[1], int(shape_of(w)[0]))
        elif packet in (aten.mm, aten.matmul, aten.addmm):
            a, b = (node.args[1], node.args[2]) if packet is aten.addmm else (node.args[0], node.args[1])
            w = _root(b, names)
            piece = _piece(b, names)
            if w is not None and len(shape_of(w)) == 2 and len(shape_of(b)) == 2:
                site = Site(node, w, a, int(shape_of(b)[1]))
            elif piece is not None and piece[1][0] == 1:
                site = Site(node, piece[0], a, piece[1][2] - piece[1][1], window=piece[1])
            elif (stack := stacked_root(b, names)) is not None:  # expert matrices (plan/experts.py)
                site = Site(node, stack, a, int(shape_of(b)[-1]))
        if site is not None:
            name = names[site.weight]
            key = piece_key(name, site.window) if site.window is not None else name
            sites.append(Site(site.node, site.weight, site.activation, site.out_features, key, site.window))
    return sites


def _collective_counts(prop: Propagation, output: fx.Node) -> tuple[int, int]:
    """(collectives, all-gathers not feeding the program output)."""
    total = internal = 0
    for red, consumers in prop.collectives():
        total += 1
        if red.collective == "all_gather" and any(c is not output for c in consumers):
            internal += 1
    return total, internal


def _group_splits(group: list[Site], units: dict[Site, int], tp: int) -> dict[Site, Shard] | None:
    """Split every site of a sibling group into the same number of whole groups of units per rank; when
    there are fewer groups than ranks (grouped-query attention at tp > KV heads), split the largest sites
    by unit and give the smallest ones the (overlapping) slices those units need."""
    counts = {}
    for s in group:
        if s.out_features % units[s]:
            return None
        counts[s] = s.out_features // units[s]
    groups = math.gcd(*counts.values())
    if groups >= tp:
        split = balanced_split(groups, tp)
        return {s: Shard(0, tuple(g * (counts[s] // groups) * units[s] for g in split)) for s in group}
    shared = _shared_unit_split(set(counts.values()), tp)
    if shared is None:
        return None
    big, small = shared
    return {s: (big if counts[s] == big.total else small).scaled(units[s]) for s in group}


def _shared_unit_split(counts: set[int], tp: int) -> tuple[Shard, Shard] | None:
    """Unit splits (large, small) for sites with ``g * n`` and ``n`` units, ``n < tp <= g * n``: the large
    site balanced (or group-aligned when balanced cuts a group unevenly), the small one by need."""
    if len(counts) != 2:
        return None
    small, big = sorted(counts)
    if big % small or tp > big:
        return None
    g = big // small
    candidates = [Shard(0, balanced_split(big, tp))]
    if tp >= small and max(balanced_split(tp, small)) <= g:
        aligned = [n for ranks in balanced_split(tp, small) for n in balanced_split(g, ranks)]
        candidates.append(Shard(0, tuple(aligned)))
    for q in candidates:
        kv = kv_split(q, g)
        if kv is not None:
            return q, kv
    return None


class PlanSearch:
    def __init__(
        self,
        gm: fx.GraphModule,
        tp: int,
        names: dict[fx.Node, str],
        user_inputs: set[fx.Node],
        sharded_outputs: bool = False,
        moe: str = DEFAULT_MOE,
    ) -> None:
        self.gm, self.tp, self.names, self.user_inputs = gm, tp, names, user_inputs
        self.moe = moe
        self.sharded_outputs = sharded_outputs
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.trials = 0

    def run(self, plan: ShardingPlan) -> Propagation:
        self.trials += 1
        return propagate(self.gm, self.tp, plan, self.names, self.user_inputs, self.sharded_outputs)

    def search(self, plan_file: PlanFile | None = None) -> tuple[ShardingPlan, Propagation]:
        sites = find_sites(self.gm, self.names)
        fixed: dict[str, ParamDecision] = {}
        forced_col: set[str] = set()
        for site in sites:
            style = plan_file.style_for(self.names[site.weight]) if plan_file else None
            if style == "colwise":
                forced_col.add(self.names[site.weight])
            elif style is not None:
                fixed[self.names[site.weight]] = ParamDecision(style)
        if plan_file:
            for name in self.names.values():
                style = plan_file.style_for(name)
                if style is not None and style != "colwise":
                    fixed.setdefault(name, ParamDecision(style))
        for name, decision in expert_decisions(self.gm, self.names, self.tp, self.moe).items():
            fixed.setdefault(name, decision)
        plan = ShardingPlan(self.tp, fixed)
        prop = self.run(plan)
        if self.tp == 1:
            return plan, prop
        tried: set[str] = set(fixed)

        def done(s: Site) -> bool:
            return s.key in tried or self.names[s.weight] in fixed

        for site in sites:
            if done(site):
                continue
            if not isinstance(prop.placements.get(site.activation), Replicate):
                tried.add(site.key)
                continue
            group = [s for s in sites if s.activation is site.activation and not done(s)]
            tried.update(s.key for s in group)
            forced = any(self.names[s.weight] in forced_col for s in group)
            kept, prop = self._try_group(plan, prop, group, forced)
            if kept is plan:  # not splittable together: try its same-width parts (plan/experts.py)
                for part in feature_classes(group):
                    kept, prop = self._try_group(kept, prop, part, forced)
            plan = kept
        return plan, prop

    def _try_group(
        self, plan: ShardingPlan, prop: Propagation, group: list[Site], forced: bool
    ) -> tuple[ShardingPlan, Propagation]:
        base_total, base_internal = _collective_counts(prop, self.output)
        units = dict.fromkeys(group, 1)
        for _ in range(MAX_UNIT_RETRIES):
            splits = _group_splits(group, units, self.tp)
            if splits is None:
                break
            trial_plan = plan.with_decisions(
                {s.key: ParamDecision("colwise", splits[s].sizes, splits[s].starts) for s in group}
            )
            trial = self.run(trial_plan)
            total, internal = _collective_counts(trial, self.output)
            sharded = all(isinstance(_stored(trial, s), Shard) for s in group)
            if trial.refusals:
                break
            if sharded and internal <= base_internal and total <= base_total + 1:
                return trial_plan, trial
            hints = [h for h in trial.unit_hints if h > 1]
            if not hints:
                if forced:
                    return trial_plan, trial
                break
            for s in group:
                unit = math.lcm(units[s], *hints)
                if s.out_features % unit == 0:
                    units[s] = unit
        return plan, prop


def _stored(prop: Propagation, site: Site) -> object:
    """How the weight (or the weight's piece) a site reads is stored."""
    if site.window is not None:
        return prop.pieces.get(site.weight, {}).get(site.window)
    return prop.roots.get(site.weight)


def choose_plan(
    gm: fx.GraphModule,
    tp: int,
    names: dict[fx.Node, str],
    user_inputs: set[fx.Node],
    plan_file: PlanFile | None = None,
    sharded_outputs: bool = False,
    moe: str = DEFAULT_MOE,
) -> tuple[ShardingPlan, Propagation]:
    """The automatic plan (with the plan file's overrides applied first) and its propagation."""
    return PlanSearch(gm, tp, names, user_inputs, sharded_outputs, moe).search(plan_file)
