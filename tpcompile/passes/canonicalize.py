"""Canonical forms that the placement rules expect, applied to the captured graph before planning.

Invariant: the rewritten graph computes exactly the same values. Conversions that change nothing are
dropped, and grouped-query attention
written as ``repeat_kv`` (``unsqueeze -> expand -> reshape`` that repeats each KV head g times) feeding
``scaled_dot_product_attention`` becomes SDPA with ``enable_gqa=True`` on the unrepeated KV. The repeat
would otherwise bake the global group size into the graph, while a rank's local query/KV ratio may differ
(SmolLM2 at tp=4: one rank holds query heads of two KV heads, one each).
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _repeated_kv(node: object) -> tuple[fx.Node, int] | None:
    """``x`` and g when ``node`` is ``reshape(expand(unsqueeze(x, 2), [B, H, g, S, D]), [B, H*g, S, D])``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target == aten.expand.default):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2):
        return None
    x = unsq.args[0]
    if not isinstance(x, fx.Node):
        return None
    xs = tuple(x.meta["val"].shape)
    es = tuple(expand.meta["val"].shape)
    out = tuple(node.meta["val"].shape)
    if len(xs) != 4 or len(es) != 5 or len(out) != 4:
        return None
    g = es[2]
    if not isinstance(g, int) or out[1] != xs[1] * g or out[2:] != xs[2:] or out[0] != xs[0]:
        return None
    return x, g


def drop_no_op_conversions(gm: fx.GraphModule) -> int:
    """Remove metadata assertions, aliases and ``to`` calls that change nothing (same dtype, device and
    layout): they are most of the nodes of an fp32 norm, and each costs time at every decode step."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            removed += 1
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or "val" not in source.meta or "val" not in node.meta:
            continue
        if node.target == aten.alias.default or (
            node.target in _CONVERSIONS and not node.kwargs.get("copy") and _same_tensor_type(source, node)
        ):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.recompile()
    return removed


_CONVERSIONS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device)  # these return self when nothing changes


def _same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta["val"], b.meta["val"]
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    return va.dtype == vb.dtype and va.device == vb.device and va.layout == vb.layout


def fold_repeat_kv_into_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite repeat_kv + SDPA into SDPA(enable_gqa=True); return how many attention calls changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.target != aten.scaled_dot_product_attention.default or node.kwargs.get("enable_gqa"):
            continue
        k, v = _repeated_kv(node.args[1]), _repeated_kv(node.args[2])
        if k is None or v is None or k[1] != v[1] or k[1] == 1:
            continue
        old = [node.args[1], node.args[2]]
        node.args = (node.args[0], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for reshape in old:
            _erase_unused_chain(gm.graph, reshape)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _erase_unused_chain(graph: fx.Graph, node: object) -> None:
    """Erase ``node`` and then its view inputs while nothing uses them (only the repeat_kv views)."""
    while (
        isinstance(node, fx.Node)
        and not node.users
        and node.target in (*_RESHAPES, aten.expand.default, aten.unsqueeze.default)
    ):
        parent = node.args[0]
        graph.erase_node(node)
        node = parent
