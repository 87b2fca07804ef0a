"""Local-shape rewriting: build rank r's graph from the global graph and its placements.

Invariant: rank r's graph has the same nodes in the same order, each in its local form (shape literals that
name a sharded dim rewritten to rank r's size, vocabulary lookups masked to its range), with the recorded
redistributions inserted before their first consumer and shared by later ones. Parameters and buffers become
``get_attr`` nodes of the stored tensors' names, so the graph's only placeholders are the user inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.collectives import redistribute
from tpcompile.passes.graph_queries import shape_of
from tpcompile.passes.rule_api import NodeOut, Propagation
from tpcompile.runtime.format.placement import RootPlacement


class RankBuilder:
    """Emits nodes into rank ``rank``'s graph; rules' lowering callbacks receive it (``LoweringBuilder``)."""

    def __init__(self, prop: Propagation, rank: int, comm_dtype: torch.dtype | None = None) -> None:
        self.prop = prop
        self.rank = rank
        self.tp = prop.tp
        self.comm_dtype = comm_dtype
        self.graph = fx.Graph()

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(target, tuple(args), kwargs)

    def placement(self, node: fx.Node) -> NodeOut:
        return self.prop.placements.get(node)

    def stored(self, node: fx.Node) -> RootPlacement:
        return self.prop.roots[node]


def build_rank_graph(
    gm: fx.GraphModule,
    prop: Propagation,
    rank: int,
    state_names: dict[fx.Node, str],
    comm_dtype: torch.dtype | None = None,
) -> fx.Graph:
    """Rank ``rank``'s graph; all-reduce payloads wider than ``comm_dtype`` cross in it (``--comm-dtype``)."""
    b = RankBuilder(prop, rank, comm_dtype)
    env: dict[fx.Node, Any] = {}
    converted: dict[tuple[fx.Node, Any], fx.Node] = {}

    def value_for(producer: fx.Node, consumer: fx.Node) -> Any:
        red = prop.redistributions.get((consumer, producer))
        if red is None:
            return env[producer]
        key = (producer, red.dst)
        if key not in converted:
            val = producer.meta.get("val")
            dtype = val.dtype if isinstance(val, torch.Tensor) else None
            converted[key] = redistribute(b, env[producer], red.src, red.dst, len(shape_of(producer)), dtype)
        return converted[key]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node in state_names:
                env[node] = b.graph.get_attr(state_names[node])
            else:
                env[node] = b.graph.placeholder(node.name)
            continue

        def load(n: fx.Node, consumer: fx.Node = node) -> Any:
            return value_for(n, consumer)

        args = fx.map_arg(node.args, load)
        kwargs = fx.map_arg(node.kwargs, load)
        if node.op == "output":
            b.graph.output(args[0])
            continue
        if node.op != "call_function":
            raise NotImplementedError(f"{node.op} nodes are not supported ({node.name})")
        lower = prop.lowerings.get(node)
        new = lower(b, node, args, kwargs) if lower else b.call(node.target, *args, **kwargs)
        new.meta["source_node"] = node.name
        if "stack_trace" in node.meta:
            new.meta["stack_trace"] = node.meta["stack_trace"]
        env[node] = new
    b.graph.lint()
    return b.graph


def tensor_bytes(node: fx.Node) -> int:
    """Bytes of a tensor node's value at the example sizes (symbolic dims take their hint)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else int(s)
    return numel * val.element_size()
