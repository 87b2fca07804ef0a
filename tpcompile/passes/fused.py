"""Fused projections: one matrix product whose output is cut along its features into pieces (GPT-2's
``c_attn`` split into q, k, v; Phi-3's ``qkv_proj`` sliced and ``gate_up_proj`` chunked) becomes one product
per piece, each reading a slice of the stored weight (and bias).

Invariant: the rewritten graph computes the same values (a column of a product depends only on its column of
the weight). Every piece is then a product of its own, so the planner splits each piece by heads (or
balanced) as it would split separate q/k/v or gate/up projections, and the weight is stored per rank as its
pieces' local slices (``Pieces``). Products whose output is used whole, or cut into overlapping pieces, are
left alone (and are then simply not split along the cut).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from tpcompile.passes.graph_queries import slice_bounds

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
Span = tuple[int, int]


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _product(node: fx.Node) -> tuple[fx.Node, int, fx.Node | None] | None:
    """(weight, its output-feature dim, bias) of ``linear(x, W, b)`` or ``addmm(b, x, W)`` on a stored W."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        w = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        dim = 0
    elif node.target == aten.addmm.default:
        w, bias, dim = node.args[2], node.args[0], 1
    else:
        return None
    if not (isinstance(w, fx.Node) and w.op == "placeholder" and _val(w) is not None and _val(w).dim() == 2):
        return None
    return w, dim, bias if isinstance(bias, fx.Node) else None


def _last_dim(node: fx.Node, dim: Any) -> bool:
    nd = _val(node.args[0]).dim()
    return isinstance(dim, int) and dim % nd == nd - 1


def _spans_of(user: fx.Node, size: int) -> list[Span] | None:
    """The feature ranges ``user`` reads from the fused output (one per output of a split)."""
    if user.target == aten.slice.Tensor:
        bounds = slice_bounds(user)
        if bounds is None or not _last_dim(user, bounds[0]):
            return None
        return [(bounds[1], bounds[2])]
    if user.target in _SPLITS:
        dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
        if not _last_dim(user, dim):
            return None
        if any(u.target is not operator.getitem or not isinstance(u.args[1], int) for u in user.users):
            return None
        spans, at = [], 0
        for piece in _val(user):
            width = piece.shape[-1]
            if not isinstance(width, int):
                return None
            spans.append((at, at + width))
            at += width
        return spans
    return None


def _fused_output(node: fx.Node, size: int) -> tuple[fx.Node, list[Any] | None]:
    """The value the pieces are cut from and, when it is a view of the product that keeps the feature dim
    last (``addmm`` output ``[B*T, 3E]`` viewed as ``[B, T, 3E]``), the view's sizes."""
    if len(node.users) == 1:
        (user,) = node.users
        sizes = user.args[1] if len(user.args) > 1 else None
        if user.target in _VIEWS and isinstance(sizes, list | tuple) and sizes[-1] == size:
            return user, list(sizes)
    return node, None


def _insert(graph: fx.Graph, target: Any, args: tuple[Any, ...], like: fx.Node) -> fx.Node:
    node = graph.call_function(target, args)
    fake = torch._guards.detect_fake_mode([_val(like)])
    with fake if fake is not None else torch.no_grad():
        node.meta["val"] = target(*fx.map_arg(args, _val))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _split_one(graph: fx.Graph, node: fx.Node) -> bool:
    found = _product(node)
    if found is None:
        return False
    w, wdim, bias = found
    size = int(_val(w).shape[wdim])
    fused, view_sizes = _fused_output(node, size)
    if _val(fused).shape[-1] != size or not fused.users:
        return False
    per_user: dict[fx.Node, list[Span]] = {}
    for user in fused.users:
        spans = _spans_of(user, size)
        if spans is None:
            return False
        per_user[user] = spans
    distinct = sorted({s for spans in per_user.values() for s in spans})
    if len(distinct) < 2 or any(a[1] > b[0] for a, b in zip(distinct, distinct[1:], strict=False)):
        return False
    first = next(n for n in graph.nodes if n in per_user)
    made: dict[Span, fx.Node] = {}
    with graph.inserting_before(first):
        for lo, hi in distinct:
            piece_w = _insert(graph, aten.slice.Tensor, (w, wdim, lo, hi), node)
            piece_b: Any = bias
            if bias is not None and _val(bias).shape[-1] == size:
                piece_b = _insert(graph, aten.slice.Tensor, (bias, _val(bias).dim() - 1, lo, hi), node)
            if node.target == aten.linear.default:
                out = _insert(graph, aten.linear.default, (node.args[0], piece_w, piece_b), node)
            else:
                out = _insert(graph, aten.addmm.default, (piece_b, node.args[1], piece_w), node)
                out.kwargs = dict(node.kwargs)
            if view_sizes is not None:
                out = _insert(graph, fused.target, (out, [*view_sizes[:-1], hi - lo]), fused)
            made[(lo, hi)] = out
    for user, spans in per_user.items():
        if user.target == aten.slice.Tensor:
            user.replace_all_uses_with(made[spans[0]])
        else:
            for item in list(user.users):
                index = item.args[1]
                assert isinstance(index, int)
                item.replace_all_uses_with(made[spans[index]])
                graph.erase_node(item)
        graph.erase_node(user)
    if fused is not node:
        graph.erase_node(fused)
    graph.erase_node(node)
    return True


def split_fused_projections(gm: fx.GraphModule) -> int:
    """Rewrite every fused projection (see the module docstring); return how many were split."""
    changed = sum(_split_one(gm.graph, node) for node in list(gm.graph.nodes))
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
