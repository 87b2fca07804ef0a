"""Attention over the filled part of a static KV cache only.

A causal LM's program holds a KV cache of ``max_seq_len`` positions and masks the ones not written yet,
so every decode step, as exported, attends over the whole cache: with the default 4096 positions that is
most of a small model's step.  Keys whose mask column is closed for every query contribute exactly zero
(``exp(-inf) == 0``), so this module cuts the trailing closed columns off the keys, values and mask before
calling ``scaled_dot_product_attention``.

Invariants:
- a column is cut only if the mask closes it for every batch row, head and query: a ``False`` boolean or
  an additive ``-inf`` / dtype-minimum value (the masks ``transformers`` builds); anything else is kept,
  so the result equals the full attention up to floating-point summation order;
- without a mask, with ``is_causal``, or with a mask that broadcasts over the key dimension, the call is
  passed through unchanged;
- the cut length is computed once per mask tensor (every layer of a step shares one mask) and cached
  while that tensor object is alive; so only calls whose mask is computed inside the graph and used by
  nothing but attention are rewritten (a fresh, never-mutated tensor on every run of the program);
- in a graph to be compiled, a mask that several attention calls read goes through
  ``tpcompile::computed_once`` first: Inductor recomputes a cheap elementwise value inside every kernel that
  reads it, so a causal mask over ``max_seq_len`` positions was otherwise rebuilt for each of the 30-60
  attention calls of a decode step (~17% of a SmolLM2 step at 4096 positions, whatever the context);
- CPU only: the cut length is a host integer (``nonzero`` + ``int``), which on a GPU would stop the host
  at every layer of every step and break CUDA graphs.  A program on any other device is not rewritten and
  attends over the whole cache (same result, one fixed shape), and a mask on another device passes
  through :func:`prefix_attention` uncut.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..load.graph_rewrite import graph_modules, retarget_calls, tensors_on_cpu

__all__ = ["attended_prefix", "computed_once", "prefix_attention", "use_prefix_attention"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_cached: tuple[weakref.ref[torch.Tensor], torch.dtype, int, torch.Tensor] | None = None


def _closed(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return ~mask
    return (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)


def attended_prefix(mask: torch.Tensor) -> int:
    """Length of the key prefix that ``mask`` leaves open for at least one query (its last dim if all)."""
    keys = mask.shape[-1]
    open_columns = (~_closed(mask)).reshape(-1, keys).any(0).nonzero()
    return int(open_columns[-1]) + 1 if open_columns.numel() else keys


def _window(mask: torch.Tensor, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(attended prefix length, the mask cut to it, boolean masks made additive in ``dtype`` as
    ``scaled_dot_product_attention`` would), computed once per mask object."""
    global _cached
    if _cached is not None:
        ref, cached_dtype, length, cut = _cached
        if ref() is mask and cached_dtype == dtype:
            return length, cut
    length = attended_prefix(mask)
    cut = mask[..., :length]
    if cut.dtype == torch.bool:
        cut = torch.zeros(cut.shape, dtype=dtype, device=cut.device).masked_fill_(~cut, float("-inf"))
    _cached = (weakref.ref(mask), dtype, length, cut)
    return length, cut


def prefix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over the keys the mask leaves open (see the module doc)."""
    keys = key.shape[-2]
    if (
        attn_mask is not None
        and not is_causal
        and attn_mask.device.type == "cpu"
        and attn_mask.dim() >= 2
        and attn_mask.shape[-1] == keys > 1
    ):
        length, attn_mask = _window(attn_mask, query.dtype)
        key, value = key[..., :length, :], value[..., :length, :]
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs
    )


@torch.library.custom_op("tpcompile::prefix_attention", mutates_args=())
def _prefix_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """:func:`prefix_attention` as an opaque op for compiled graphs (the cut length depends on data).

    The result is contiguous, as its fake says: compiled code reads it with the fake's strides, and SDPA
    may return a transposed layout (prefill), which would be read as garbage."""
    return prefix_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    ).contiguous()


@_prefix_attention_op.register_fake
def _prefix_attention_fake(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *options: object
) -> torch.Tensor:
    """Shape of the result: the query's, with the value's feature size (the options do not change it)."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.custom_op("tpcompile::computed_once", mutates_args=())
def computed_once(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t``: an opaque op, so that compiled code stores ``t`` once for all its readers
    instead of recomputing it inside each of them (the C++ library's kernel replaces this one)."""
    return t.clone(memory_format=torch.contiguous_format)


@computed_once.register_fake
def _computed_once_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


_DEFAULTS: dict[str, object] = dict(
    attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
)


def _sdpa_options(node: torch.fx.Node) -> dict[str, object]:
    """The SDPA node's optional arguments by name, defaults filled in."""
    values = dict(_DEFAULTS)
    values.update(zip(_DEFAULTS, node.args[3:], strict=False))
    values.update({k: v for k, v in node.kwargs.items() if k in _DEFAULTS})
    return values


def _op_args(node: torch.fx.Node) -> tuple[tuple[object, ...], dict[str, object]]:
    """The SDPA node's arguments, all positional, as the custom op takes them."""
    values = _sdpa_options(node)
    return (*node.args[:3], *(values[name] for name in _DEFAULTS)), {}


def _rewritable(node: torch.fx.Node) -> bool:
    """A masked attention whose mask is made in the graph and only read by attention calls."""
    mask = _sdpa_options(node)["attn_mask"]
    return (
        isinstance(mask, torch.fx.Node)
        and mask.op == "call_function"
        and all(user.target in _ATTENTION_TARGETS for user in mask.users)
    )


_ATTENTION_TARGETS = (_SDPA, prefix_attention, torch.ops.tpcompile.prefix_attention.default)


def use_prefix_attention(module: torch.nn.Module, *, custom_op: bool = False) -> int:
    """Point every ``aten.scaled_dot_product_attention`` of ``module``'s graphs at :func:`prefix_attention`
    (or its custom op, for a graph that will be compiled); return how many.  A module whose tensors are
    not all on the CPU is left as it is (returns 0; see the module invariants)."""
    if not tensors_on_cpu(module):
        return 0
    if custom_op:
        op = torch.ops.tpcompile.prefix_attention.default
        count = retarget_calls(module, _SDPA, op, _op_args, where=_rewritable)
        _compute_shared_masks_once(module)
        return count
    return retarget_calls(module, _SDPA, prefix_attention, where=_rewritable)


def _compute_shared_masks_once(module: torch.nn.Module) -> None:
    """Make the attention calls that share a mask read one ``computed_once`` copy of it."""
    op = torch.ops.tpcompile.prefix_attention.default
    once = torch.ops.tpcompile.computed_once.default
    for gm in graph_modules(module):
        masks = dict.fromkeys(n.args[3] for n in gm.graph.nodes if n.op == "call_function" and n.target == op)
        shared = [m for m in masks if isinstance(m, torch.fx.Node) and len(m.users) > 1 and m.target != once]
        for mask in shared:
            with gm.graph.inserting_after(mask):
                copy = gm.graph.call_function(once, (mask,))
            for user in list(mask.users):
                if user is not copy:
                    user.replace_input_with(mask, copy)
        if shared:
            gm.recompile()
