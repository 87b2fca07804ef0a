"""Mixture-of-experts plans: how stacked expert weights are split (``tpcompile --moe tp|ep``).

A *stacked weight* is a stored tensor of 3 or more dims read by a matrix product as ``b`` (directly or
through a transpose) with its leading dim kept first: a batch of per-expert matrices. Found from the graph
alone (no module names). Two modes:

- ``tp`` (default): every expert is split like an MLP. The stacked products are ordinary plan-search sites
  (gate/up column-parallel, down row-parallel by propagation); the router stays replicated (its top-k
  needs every expert's score); one all-reduce after the block, plus the attention one: 2 per layer.
- ``ep``: expert parallelism. Every stacked weight is split on its expert dim (balanced, uneven allowed:
  8 experts on 3 ranks -> 3,3,2); each rank computes its experts' weighted outputs, the sum over experts
  is a partial sum, and the same single all-reduce per block completes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx

from tpcompile.errors import UsageError
from tpcompile.plan.spec import ParamDecision, Style
from tpcompile.runtime.format.placement import Shard, balanced_split

MoeMode = Literal["tp", "ep"]
MOE_MODES: tuple[MoeMode, ...] = ("tp", "ep")
DEFAULT_MOE: MoeMode = "tp"

aten = torch.ops.aten
_PERMUTES = (aten.t.default, aten.transpose.int, aten.permute.default)
_PRODUCTS = (aten.matmul.default, aten.bmm.default)

COMMUNICATION = {
    "tp": "every expert split like an MLP (gate/up column-parallel, down row-parallel), router replicated: "
    "one all-reduce after each MoE block",
    "ep": "each rank holds whole experts and computes their weighted outputs for every token (zero weight "
    "where a token is not routed to them): one all-reduce after each MoE block sums the experts",
}


@dataclass(frozen=True)
class StackedProduct:
    node: fx.Node  # the matrix product
    weight: fx.Node  # the stored tensor's placeholder
    activation: fx.Node
    out_features: int


def _shape(node: Any) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def stacked_root(value: Any, names: dict[fx.Node, str]) -> fx.Node | None:
    """The stored tensor behind ``value`` when it is one of >= 3 dims seen through permutations that keep
    its leading dim first."""
    node = value
    while isinstance(node, fx.Node) and node not in names:
        if node.op != "call_function" or node.target not in _PERMUTES:
            return None
        node = node.args[0]
    if not isinstance(node, fx.Node) or len(_shape(node)) < 3 or len(_shape(value)) != len(_shape(node)):
        return None
    if _shape(value)[0] != _shape(node)[0]:
        return None
    return node


def stacked_products(gm: fx.GraphModule, names: dict[fx.Node, str]) -> list[StackedProduct]:
    out: list[StackedProduct] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _PRODUCTS:
            continue
        a, b = node.args[0], node.args[1]
        w = stacked_root(b, names)
        if w is not None and isinstance(a, fx.Node):
            out.append(StackedProduct(node, w, a, int(_shape(b)[-1])))
    return out


def expert_decisions(
    gm: fx.GraphModule, names: dict[fx.Node, str], tp: int, mode: str
) -> dict[str, ParamDecision]:
    """Fixed decisions for ``--moe ep`` (every stacked weight split on its expert dim); none for ``tp``,
    where the plan search treats the stacked products like any other site."""
    if mode not in MOE_MODES:
        raise UsageError(f"--moe must be one of {', '.join(MOE_MODES)} (got {mode})")
    if mode != "ep" or tp == 1:
        return {}
    decisions: dict[str, ParamDecision] = {}
    for p in stacked_products(gm, names):
        experts = _shape(p.weight)[0]
        if experts < tp:
            raise UsageError(
                f"--moe ep needs at least one expert per rank: {names[p.weight]} has {experts} experts "
                f"for tp={tp}; use --tp <= {experts} or --moe tp"
            )
        decisions[names[p.weight]] = ParamDecision(Style.EXPERT, balanced_split(experts, tp), dim=0)
    return decisions


def feature_classes(group: list[Any]) -> list[list[Any]]:
    """Sibling sites split by output width, widest first: when a whole sibling group cannot be split
    together (a router or a 1-wide gate beside an MLP), its MLP-shaped parts are tried on their own."""
    classes: dict[int, list[Any]] = {}
    for site in group:
        classes.setdefault(site.features, []).append(site)
    return [classes[k] for k in sorted(classes, reverse=True)] if len(classes) > 1 else []


def describe_experts(
    names: dict[fx.Node, str], roots: dict[fx.Node, Any], gm: fx.GraphModule, mode: str
) -> dict[str, Any] | None:
    """The manifest's ``extra.moe``: the mode, its communication and every stacked weight's layout."""
    products = stacked_products(gm, names)
    if not products:
        return None
    weights: dict[str, Any] = {}
    for p in products:
        pl = roots.get(p.weight)
        entry: dict[str, Any] = {"experts": _shape(p.weight)[0], "placement": str(pl)}
        if isinstance(pl, Shard) and pl.dim == 0:
            entry["experts_per_rank"] = list(pl.sizes)
        weights[names[p.weight]] = entry
    return {"mode": mode, "communication": COMMUNICATION.get(mode, ""), "weights": weights}
