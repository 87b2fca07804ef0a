"""Automatic plan selection from the graph's structure.

A *site* is a matrix product or lookup whose weight is a free stored tensor, in whatever layout the program
reads it (``linear``, ``x @ W``, ``x @ W.T``, ``mm``/``addmm`` after ``run_decompositions()``, an einsum
projection, ``embedding``, ``E[idx]``, ``index_select``): the op rules offer them while propagating
(``Propagation.sites``), with the stored dim that holds the output features. Walking the sites in program
order, each one whose activation arrives replicated is tried as the start of a column-parallel chain (a
lookup: a vocabulary-parallel table), together with its siblings (the sites reading views of the same
activation: q/k/v, gate/up). Propagation is the judge: the trial is kept when it adds at most one collective
and no all-gather inside the program (the chain ends in a row-parallel product whose partial sum is reduced
once). The split unit comes from the graph: when a reshape downstream needs shard sizes that are multiples
of a head size, the trial is repeated with that unit, so heads (and grouped-query KV groups) are never cut.
A weight stored in quantization blocks (``blocks``: a packed GGUF tensor) is the same kind of constraint: a
trial that would cut its input dim inside a block is repeated with the block as the unit, and a tp at which
no block-aligned split exists is refused (a row-parallel cut never splits a block).
A weight a site could have split that stays whole gets a reason (``ShardingPlan.unsplit``); when the reason
is only that tp exceeds its whole units, the most ranks it could be split over (``ShardingPlan.rank_limits``)
and a warning saying so. A tp at which no weight can be split at all is refused: no rank would hold work.
"""

from __future__ import annotations

import math

import torch.fx as fx

from tpcompile.errors import UsageError
from tpcompile.passes.graph_queries import feature_unit, kv_cover, kv_split, same_data_root, written_in_place
from tpcompile.passes.propagate import propagate
from tpcompile.passes.rule_api import PlanSite, Propagation, SiteKind
from tpcompile.plan.experts import DEFAULT_MOE, expert_decisions, feature_classes
from tpcompile.plan.spec import ChainClass, ParamDecision, PlanFile, ShardingPlan, Style
from tpcompile.runtime.format.placement import Pieces, Replicate, Shard, balanced_split

MAX_UNIT_RETRIES = 4


def _collective_counts(prop: Propagation, output: fx.Node) -> tuple[int, int]:
    """(collectives inside the program, the all-gathers among them). An all-gather that only assembles a
    program output is not counted: a split last product (an lm_head, tied to a vocabulary-parallel
    table or not) needs it once, wherever the chain before it ends."""
    total = internal = 0
    for red, consumers in prop.collectives():
        if red.collective == "all_gather" and all(c is output for c in consumers):
            continue
        total += 1
        internal += red.collective == "all_gather"
    return total, internal


def _group_splits(
    group: list[PlanSite], units: dict[PlanSite, int], tp: int, balanced: bool = False
) -> dict[PlanSite, Shard] | None:
    """Split every site of a sibling group into the same number of whole groups of units per rank; when
    there are fewer groups than ranks (grouped-query attention at tp > KV heads), split the largest sites
    by unit and give the smallest ones the (overlapping) slices those units need. ``balanced``: split the
    largest sites' units evenly even where that cuts a group (query heads 5+4 over 3 KV heads), the smallest
    ones covering what each rank needs."""
    counts = {}
    for s in group:
        if s.features % units[s]:
            return None
        counts[s] = s.features // units[s]
    groups = math.gcd(*counts.values())
    shared = _shared_unit_split(set(counts.values()), tp, cut_groups=True) if balanced else None
    if shared is None and groups >= tp:
        split = balanced_split(groups, tp)
        return {s: Shard(0, tuple(g * (counts[s] // groups) * units[s] for g in split)) for s in group}
    shared = shared or _shared_unit_split(set(counts.values()), tp)
    if shared is None:
        return None
    big, small = shared
    return {s: (big if counts[s] == big.total else small).scaled(units[s]) for s in group}


def _shared_unit_split(counts: set[int], tp: int, cut_groups: bool = False) -> tuple[Shard, Shard] | None:
    """Unit splits (large, small) for sites with ``g * n`` and ``n`` units, ``n < tp <= g * n``: the large
    site balanced (or group-aligned when balanced cuts a group unevenly), the small one by need.
    ``cut_groups``: the large site balanced at any ``tp <= g * n``, even where that cuts a group, the small
    one covering the units each rank's share needs (``kv_cover``)."""
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
    small_split = kv_cover if cut_groups else kv_split
    for q in candidates:
        kv = small_split(q, g)
        if kv is not None:
            return q, kv
    return None


def _most_ranks(group: list[PlanSite], units: dict[PlanSite, int], tp: int) -> int:
    """The most ranks (below ``tp``) the group splits over in whole ``units``; 1 when none."""
    return next((t for t in range(tp - 1, 1, -1) if _group_splits(group, units, t) is not None), 1)


def _viewed_unit(site: PlanSite, unit: int) -> int:
    """``unit`` combined with the unit the site's outputs are viewed in (a head), when that divides it."""
    combined = math.lcm(unit, feature_unit(site.node))
    return combined if site.features % combined == 0 else unit


def _site_style(site: PlanSite) -> Style:
    return Style.VOCAB if site.kind is SiteKind.LOOKUP else Style.COLWISE


class PlanSearch:
    def __init__(
        self,
        gm: fx.GraphModule,
        tp: int,
        names: dict[fx.Node, str],
        user_inputs: set[fx.Node],
        sharded_outputs: bool = False,
        moe: str = DEFAULT_MOE,
        blocks: dict[str, int] | None = None,
        float_fix: str = "--dequantize",
        keep_whole: dict[str, str] | None = None,
        balanced: bool = False,
    ) -> None:
        self.gm, self.tp, self.names, self.user_inputs = gm, tp, names, user_inputs
        self.balanced = balanced  # split grouped units evenly, cutting groups (plan/weigh.py weighs it)
        self.keep_whole = keep_whole or {}  # site key -> why it is not tried (plan/weigh.py)
        self.float_fix = float_fix  # how the user keeps the blocked weights as floats (named in the refusal)
        given = blocks or {}
        self.blocks = {node: given[name] for node, name in names.items() if name in given}
        self.block_cuts: dict[str, tuple[str, int]] = {}  # site key -> (weight, block) a trial would cut
        self.moe = moe
        self.sharded_outputs = sharded_outputs
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.weights = set(names) - written_in_place(gm)
        self.trials = 0
        self.reasons: dict[str, str] = dict(self.keep_whole)
        self.rank_limits: dict[str, int] = {}
        self.split_groups: list[list[PlanSite]] = []  # the sibling groups that start a split chain

    def run(self, plan: ShardingPlan) -> Propagation:
        self.trials += 1
        return propagate(
            self.gm, self.tp, plan, self.names, self.user_inputs, self.sharded_outputs, self.weights
        )

    def _fixed(self, plan_file: PlanFile | None) -> tuple[dict[str, ParamDecision], set[str]]:
        """The plan file's decisions (colwise ones only mark their sites as forced) and --moe ep's."""
        fixed: dict[str, ParamDecision] = {}
        forced_col: set[str] = set()
        if plan_file:
            for name in self.names.values():
                style = plan_file.style_for(name)
                if style is Style.COLWISE:
                    forced_col.add(name)
                elif style is not None:
                    fixed[name] = ParamDecision(style)
        for name, decision in expert_decisions(self.gm, self.names, self.tp, self.moe).items():
            fixed.setdefault(name, decision)
        return fixed, forced_col

    def search(self, plan_file: PlanFile | None = None) -> tuple[ShardingPlan, Propagation]:
        fixed, forced_col = self._fixed(plan_file)
        plan = ShardingPlan(self.tp, fixed)
        prop = self.run(plan)
        sites = list(prop.sites)
        if self.tp == 1:
            return plan, prop
        tried: set[str] = set(fixed) | set(self.keep_whole)

        def done(s: PlanSite) -> bool:
            return s.key in tried or self.names[s.weight] in fixed

        for site in sites:
            if done(site):
                continue
            if not isinstance(prop.placements.get(site.activation), Replicate):
                tried.add(site.key)
                self.reasons.setdefault(site.key, "its input is already split or partial where it is read")
                continue
            root = same_data_root(site.activation)
            group = [s for s in sites if same_data_root(s.activation) is root and not done(s)]
            tried.update(s.key for s in group)
            forced = any(self.names[s.weight] in forced_col for s in group)
            kept, prop = self._try_group(plan, prop, group, forced)
            if kept is plan:  # not splittable together: try its same-width parts (plan/experts.py)
                for part in feature_classes(group):
                    before = kept
                    kept, prop = self._try_group(kept, prop, part, forced)
                    if kept is not before:
                        self.split_groups.append(part)
            else:
                self.split_groups.append(group)
            plan = kept
        plan.unsplit = self._unsplit(sites, prop, fixed)
        plan.chain_classes = chain_classes(self.split_groups)
        plan.rank_limits = {k: n for k, n in self.rank_limits.items() if k in plan.unsplit}
        self._check_block_cuts(plan)
        self._check_rank_count(plan, prop)
        return plan, prop

    def _cut_block(self, prop: Propagation) -> tuple[str, int] | None:
        """The first block-quantized weight whose split in ``prop`` would cut a block (with its block)."""
        for node, block in self.blocks.items():
            pl = prop.roots.get(node)
            if not isinstance(pl, Shard) or pl.dim not in (1, -1):
                continue
            if any(pl.sizes[r] % block or pl.offset(r) % block for r in range(self.tp)):
                return self.names[node], block
        return None

    def _check_block_cuts(self, plan: ShardingPlan) -> None:
        """Refuse a plan that leaves a weight whole only because splitting its chain would cut the
        quantization blocks of a row-parallel weight: at this tp the blocks do not go round."""
        for key in sorted(plan.unsplit):
            if key in self.block_cuts:
                weight, block = self.block_cuts[key]
                limit = self.rank_limits.get(key)
                fewer = f"--tp {limit} or less" if limit else "a smaller --tp"
                raise UsageError(
                    f"--tp {self.tp} cannot split {weight} on its quantization blocks ({block} input "
                    f"features each): {plan.unsplit[key]}; use {fewer}, or {self.float_fix}"
                )

    def _check_rank_count(self, plan: ShardingPlan, prop: Propagation) -> None:
        """Refuse a tp at which no weight is split while some would split with fewer ranks; warn (in the
        manifest's warnings) when some weights stay whole only because tp exceeds their units."""
        if not plan.rank_limits:
            return
        most = max(plan.rank_limits.values())
        widest = min(k for k, n in plan.rank_limits.items() if n == most)
        if not any(isinstance(pl, Shard | Pieces) for pl in prop.roots.values()):
            raise UsageError(
                f"--tp {self.tp} is more ranks than any weight of the model can be split over: at most "
                f"{most} ranks can hold work ({widest}, in {most} whole units); use --tp {most} or less"
            )
        fewest = min(plan.rank_limits.values())
        first = min(k for k, n in plan.rank_limits.items() if n == fewest)
        more = f" (and {len(plan.rank_limits) - 1} more weights)" if len(plan.rank_limits) > 1 else ""
        prop.warnings.append(
            f"only {fewest} of the {self.tp} ranks can hold a share of {first}{more}: at tp={self.tp} they "
            f"are replicated on every rank; tp <= {fewest} splits them"
        )

    def _try_group(
        self, plan: ShardingPlan, prop: Propagation, group: list[PlanSite], forced: bool
    ) -> tuple[ShardingPlan, Propagation]:
        base_total, base_internal = _collective_counts(prop, self.output)
        units = dict.fromkeys(group, 1)
        reason = "its features do not split into whole units over the ranks"
        for _ in range(MAX_UNIT_RETRIES):
            splits = _group_splits(group, units, self.tp, self.balanced)
            if splits is None:
                unit = max(units.values())
                reason = f"its features do not split into whole units of {unit} over {self.tp} ranks"
                viewed = {s: _viewed_unit(s, units[s]) for s in group}  # no trial may have said it yet
                most = _most_ranks(group, viewed, self.tp)
                if most > 1:  # it would split with fewer ranks
                    unit = max(viewed.values())
                    reason = f"its whole units of {unit} features split over at most {most} ranks"
                    for s in group:
                        self.rank_limits.setdefault(s.key, most)
                break
            trial_plan = plan.with_decisions(
                {
                    s.key: ParamDecision(_site_style(s), splits[s].sizes, splits[s].starts, s.dim)
                    for s in group
                }
            )
            trial = self.run(trial_plan)
            total, internal = _collective_counts(trial, self.output)
            sharded = all(isinstance(_stored(trial, s), Shard) for s in group)
            if trial.refusals:
                reason = f"splitting it cannot be computed exactly: {trial.refusals[0]}"
                break
            cut = self._cut_block(trial)
            if cut is not None:  # a row-parallel consumer is quantized in blocks: split in whole blocks
                weight, block = cut
                reason = f"a split would cut the quantization blocks of {block} input features of {weight}"
                grown = {s: math.lcm(units[s], block) for s in group}
                grown = {s: u for s, u in grown.items() if u != units[s] and s.features % u == 0}
                for s in group:
                    self.block_cuts.setdefault(s.key, cut)
                if not grown:
                    break
                units.update(grown)
                continue
            if sharded and internal <= base_internal and total <= base_total + 1:
                return trial_plan, trial
            if internal > base_internal:
                reason = "splitting it would need an all-gather inside the program"
            elif not sharded:
                reason = "its consumers need it whole"
            else:
                reason = f"splitting it would add {total - base_total} collectives (a chain may add one)"
            hints = [h for h in trial.unit_hints if h > 1]
            if not hints:  # no reshape said which unit it needs: the one the outputs are viewed in
                hints = [u for s in group if (u := feature_unit(s.node)) > 1 and units[s] % u]
            if not hints:
                if forced:
                    return trial_plan, trial
                break
            for s in group:
                unit = math.lcm(units[s], *hints)
                if s.features % unit == 0:
                    units[s] = unit
        for s in group:
            self.reasons.setdefault(s.key, reason)
        return plan, prop

    def _unsplit(
        self, sites: list[PlanSite], prop: Propagation, fixed: dict[str, ParamDecision]
    ) -> dict[str, str]:
        """Every site weight the final plan leaves replicated (and the plan file did not), with why."""
        out: dict[str, str] = {}
        for site in sites:
            name = self.names[site.weight]
            if name in fixed or not isinstance(_stored(prop, site), Replicate | None):
                continue
            out.setdefault(site.key, self.reasons.get(site.key, "another use of it needs it whole"))
        return out


def _group_signature(group: list[PlanSite]) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """What a sibling group is made of, without names: its sites' kinds, split dims and weight shapes."""
    return tuple(sorted((s.kind.value, s.dim, tuple(s.weight.meta["val"].shape)) for s in group))


def chain_classes(groups: list[list[PlanSite]]) -> list[ChainClass]:
    """The split groups by structure (every layer's attention projections are one class, its MLP inputs
    another), in program order of their first group."""
    by_signature: dict[tuple[tuple[str, int, tuple[int, ...]], ...], list[str]] = {}
    for group in groups:
        by_signature.setdefault(_group_signature(group), []).extend(s.key for s in group)
    return [ChainClass(tuple(dict.fromkeys(keys))) for keys in by_signature.values()]


def _stored(prop: Propagation, site: PlanSite) -> object:
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
    blocks: dict[str, int] | None = None,
    float_fix: str = "--dequantize",
    keep_whole: dict[str, str] | None = None,
    balanced: bool = False,
) -> tuple[ShardingPlan, Propagation]:
    """The automatic plan (with the plan file's overrides applied first) and its propagation; ``blocks``:
    stored tensors quantized in blocks along their input dim (name -> block size); ``float_fix``: the
    option that stores them as floats, named when a tp cannot split them on their blocks; ``keep_whole``:
    site keys the search must not split (-> the reason shown for each); ``balanced``: split grouped units
    (query heads over KV heads) evenly rather than along whole groups."""
    search = PlanSearch(
        gm, tp, names, user_inputs, sharded_outputs, moe, blocks, float_fix, keep_whole, balanced
    )
    return search.search(plan_file)
