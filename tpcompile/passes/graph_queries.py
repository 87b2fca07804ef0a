"""Questions about an ATen graph that the rules, the rewrites and the planner share.

Invariant: every function here only reads the graph (and the value metadata ``torch.export`` recorded);
none depends on placements or on the plan.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx

from tpcompile.runtime.format.placement import Shard

aten = torch.ops.aten

#: Ops whose output is the same data as their first input, rearranged (a walk through them stays on it).
SAME_DATA = frozenset(
    {
        aten.view,
        aten.reshape,
        aten._unsafe_view,
        aten.permute,
        aten.transpose,
        aten.t,
        aten.numpy_T,
        aten.unsqueeze,
        aten.squeeze,
        aten.expand,
        aten.flatten,
        aten.unflatten,
        aten.clone,
        aten.contiguous,
        aten.alias,
        aten.detach,
    }
)


def packet(node: Any) -> Any:
    """The overload packet of a call node's target (``aten.view`` for ``aten.view.default``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", None)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


#: id of each traced value -> (a weak reference to it, its shape), while the value lives: a plan search asks
#: ~500k times for the shapes of the same ~1,700 values, and a symbolic size is a new Python object on every
#: ``.shape`` of a fake tensor
_SHAPES: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...]]] = {}


def shape_of(node: Any) -> tuple[Any, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"{node} is not a tensor")
    key = id(val)
    known = _SHAPES.get(key)
    if known is not None and known[0]() is val:
        return known[1]
    shape = tuple(val.shape)
    _SHAPES[key] = (weakref.ref(val, lambda _: _SHAPES.pop(key, None)), shape)
    return shape


def slice_bounds(node: Any) -> tuple[int, int, int] | None:
    """(dim, lo, hi) of a step-1 ``aten.slice`` with constant bounds (clipped to the size), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target != aten.slice.Tensor:
        return None
    args = list(node.args) + [None] * (5 - len(node.args))
    shape = shape_of(args[0])
    raw_dim, lo, hi, step = args[1] if args[1] is not None else 0, args[2] or 0, args[3], args[4] or 1
    if not isinstance(raw_dim, int):
        return None
    dim = norm_dim(raw_dim, len(shape))
    size = shape[dim]
    hi = size if hi is None else hi
    if step != 1 or not (isinstance(size, int) and isinstance(lo, int) and isinstance(hi, int)):
        return None
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    return (dim, lo, hi) if lo < hi else None


def same_data_root(node: Any) -> Any:
    """Walk back through ``SAME_DATA`` ops to the value they rearrange (sibling products read one root)."""
    while packet(node) in SAME_DATA:
        node = node.args[0]
    return node


_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)


def feature_unit(product: fx.Node) -> int:
    """The unit a reshape of ``product``'s output cuts its last (feature) dim into: ``[..., F] ->
    [..., H, D]`` has unit D (a head), ``[..., F] -> [..., 1, F]`` has unit F; 1 when no reshape splits it.
    Reshapes that keep the feature dim whole (``[B*T, F] -> [B, T, F]``) are looked through."""
    pending, seen = [product], set()
    while pending:
        node = pending.pop()
        for user in node.users:
            if packet(user) not in _RESHAPES or user in seen:
                continue
            seen.add(user)
            features, out = shape_of(node)[-1], shape_of(user)
            if not isinstance(features, int) or not all(isinstance(s, int) for s in out[-2:]):
                continue
            if out[-1] == features:
                pending.append(user)
            elif features % out[-1] == 0 and len(out) >= 2 and out[-2] * out[-1] == features:
                return int(out[-1]) if out[-2] != 1 else features
    return 1


def written_in_place(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders that an op writes in place (a KV cache), directly or through a view."""
    written: set[fx.Node] = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments[: len(node.args)]):
            if arg.alias_info is not None and arg.alias_info.is_write:
                root = same_data_root(node.args[i])
                if isinstance(root, fx.Node) and root.op == "placeholder":
                    written.add(root)
    return written


def kv_split(q: Shard, group: int) -> Shard | None:
    """The KV head split that serves query split ``q`` (in head units) under grouped-query attention with
    ``group`` query heads per KV head, or None if a rank's query heads are not spread evenly over its KV
    heads (then its local attention could not use one repeat factor)."""
    cover = kv_cover(q, group)
    if cover is None or any(len(set(kv_repeats(q, group, r))) != 1 for r in range(len(q.sizes))):
        return None
    return cover


def kv_cover(q: Shard, group: int) -> Shard | None:
    """The KV heads each rank of query split ``q`` (in head units) reads, as overlapping slices, whether or
    not its query heads spread evenly over them (then its attention runs once per KV head with the query
    heads that head serves: :func:`kv_repeats`); None for an overlapping or empty query split."""
    if q.overlapping or 0 in q.sizes:
        return None
    starts = [q.offset(r) // group for r in range(len(q.sizes))]
    ends = [(q.offset(r) + n - 1) // group + 1 for r, n in enumerate(q.sizes)]
    return Shard(q.dim, tuple(e - s for s, e in zip(starts, ends, strict=True)), tuple(starts))


def kv_repeats(q: Shard, group: int, rank: int) -> tuple[int, ...]:
    """How many of rank ``rank``'s query heads (split ``q``) each of its KV heads (:func:`kv_cover`) serves,
    in order."""
    lo, n = q.offset(rank), q.sizes[rank]
    first, last = lo // group, (lo + n - 1) // group
    return tuple(min(lo + n, (kv + 1) * group) - max(lo, kv * group) for kv in range(first, last + 1))


def query_split(kv: Shard, group: int) -> Shard | None:
    """The query split whose KV split is ``kv`` when every rank keeps whole groups."""
    if kv.overlapping:
        return None
    return kv.scaled(group)
