"""Binding a rank's packed (quantized) weights to its program.

A rank program names a quantized weight ``W`` with its logical float shape; the shard holds ``W`` packed
under ``W + PACKED_SUFFIX`` (``format/quant_section.py``). :func:`bind_packed_weights` takes those packed
tensors out of the loaded state, stores each on the module as a buffer beside ``W``, and rewrites the ops
that read ``W``: ``aten.linear(x, W, b)`` -> ``tpcompile::quant_linear(x, W_packed, b, format, cols)``,
``aten.embedding(W, ids)`` -> ``tpcompile::quant_embedding(W_packed, ids, format, cols)``. Any other use of
``W`` gets ``W`` itself, decoded once at load (correct, not smaller). On CPU the rows of the 32-weight
block formats (Q8_0, Q4_0, Q4_1, int8, int4_g32) are interleaved at load (``kernels/quant.py``,
``interleave_rows``: the same bytes, read faster by a decode step, 8 output rows a vector), bound as
``W_packed_x8`` with the interleaved format code; the shard keeps the file's layout.

Invariant: the rewritten program computes what the program computed with the dequantized weights, to fp32
round-off (see ``kernels/quant.py``); ``W`` no longer exists as a meta parameter afterwards (it is gone, or it
holds the decoded weight).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.fx
from torch import nn

from ..errors import ArtifactLoadError
from ..format.quant_section import PACKED_SUFFIX, QuantFormat, QuantSection
from ..kernels.quant import (
    deinterleave_rows,
    dequantize,
    interleave_rows,
    interleaves,
    load_quant_ops,
    op_code,
)
from .graph_rewrite import graph_modules
from .huge_pages import empty_in_huge_pages

__all__ = ["INTERLEAVED_ATTR_SUFFIX", "PACKED_ATTR_SUFFIX", "bind_packed_weights"]

#: Attribute name of the packed buffer beside a weight attribute ``weight`` (``weight_packed``).
PACKED_ATTR_SUFFIX = "_packed"
#: ... when its rows are interleaved (``weight_packed_x8``, 8 rows a vector): a native package built for the
#: other layout then misses its tensor by name and is not run, rather than reading bytes in the wrong order.
INTERLEAVED_ATTR_SUFFIX = "_packed_x8"

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


def _attr_owner(module: nn.Module, key: str, source: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, name, None), torch.Tensor):
        raise ArtifactLoadError(
            f"{source} has packed weights for {key!r}, which the program does not define; "
            "the artifact is inconsistent, recompile it"
        )
    return owner, name


def _rewrite_uses(gm: torch.fx.GraphModule, packed: dict[str, tuple[str, int, int]]) -> set[str]:
    """Point the linears and lookups of ``gm`` that read a weight of ``packed`` (key -> (its buffer's
    attribute suffix, the ops' format code, input features)) at its packed buffer; return the keys some
    other op of ``gm`` still reads."""
    still_read: set[str] = set()
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in packed:
            continue
        key = str(node.target)
        suffix, code, cols = packed[key]
        with gm.graph.inserting_after(node):
            buffer = gm.graph.get_attr(key + suffix)
        for user in list(node.users):
            if user.op == "call_function" and user.target is _LINEAR and user.args[1] is node:
                x, _, *rest = user.args
                bias = rest[0] if rest else user.kwargs.get("bias")
                user.target = torch.ops.tpcompile.quant_linear.default
                user.args, user.kwargs = (x, buffer, bias, code, cols), {}
            elif user.op == "call_function" and user.target is _EMBEDDING and user.args[0] is node:
                user.target = torch.ops.tpcompile.quant_embedding.default
                user.args, user.kwargs = (buffer, user.args[1], code, cols), {}
            else:
                still_read.add(key)
        if not node.users:
            gm.graph.erase_node(node)
        if not buffer.users:
            gm.graph.erase_node(buffer)
        changed = True
    if changed:
        gm.recompile()  # once per graph: recompiling a decoder's graph per weight costs seconds
    return still_read


def _interleave_in_huge_pages(
    found: dict[str, tuple[nn.Module, str, torch.Tensor, QuantFormat, int]], keys: list[str]
) -> None:
    """Replace the packed tensor of each of ``keys`` in ``found`` by its rows interleaved, in memory backed by
    huge pages where the host allows (``huge_pages.py``): a decode step streams them all."""
    places = empty_in_huge_pages([found[key][2] for key in keys])
    for key, place in zip(keys, places, strict=True):
        owner, name, packed, fmt, cols = found[key]
        place.copy_(interleave_rows(packed, fmt))
        found[key] = (owner, name, place, fmt, cols)


def bind_packed_weights(
    module: nn.Module, tensors: MutableMapping[str, torch.Tensor], section: QuantSection, source: str
) -> int:
    """Move every packed tensor of ``tensors`` (a rank's loaded state) onto ``module`` and rewrite the ops
    reading its weight; return how many weights stay packed.

    Raises:
        ArtifactLoadError: a packed tensor names no weight of the program, or does not fit its shape.
    """
    if not section.tensors:
        return 0
    load_quant_ops()
    found: dict[str, tuple[nn.Module, str, torch.Tensor, QuantFormat, int]] = {}
    bound: dict[str, tuple[str, int, int]] = {}  # key -> (buffer suffix, op format code, input features)
    for key, info in sorted(section.tensors.items()):
        packed = tensors.pop(key + PACKED_SUFFIX, None)
        if packed is None:
            raise ArtifactLoadError(f"packed weights for {key} missing in {source}")
        owner, name = _attr_owner(module, key, source)
        logical = getattr(owner, name)
        fmt = info.format
        rows, cols = (int(s) for s in logical.shape) if logical.dim() == 2 else (-1, -1)
        if (
            packed.dtype != torch.uint8
            or cols % fmt.block
            or tuple(packed.shape) != (rows, fmt.packed_cols(cols))
        ):
            raise ArtifactLoadError(
                f"packed weights for {key} in {source} have shape {list(packed.shape)} {packed.dtype}, which "
                f"does not hold the program's {list(logical.shape)} weight as {fmt.value}; recompile it"
            )
        interleaved = interleaves(fmt) and packed.device.type == "cpu"
        suffix = INTERLEAVED_ATTR_SUFFIX if interleaved else PACKED_ATTR_SUFFIX
        found[key] = (owner, name, packed, fmt, cols)
        bound[key] = (suffix, op_code(fmt, interleaved), cols)
    _interleave_in_huge_pages(found, [key for key in bound if bound[key][0] == INTERLEAVED_ATTR_SUFFIX])
    for key, (owner, name, packed, _, _) in found.items():
        owner.register_buffer(name + bound[key][0], packed, persistent=False)
    still_read: set[str] = set()
    for gm in graph_modules(module):
        still_read |= _rewrite_uses(gm, bound)
    for key, (owner, name, packed, fmt, cols) in found.items():
        if key in still_read:  # some other op reads it: give it the decoded weight too
            if bound[key][0] == INTERLEAVED_ATTR_SUFFIX:
                packed = deinterleave_rows(packed, fmt)
            tensors[key] = dequantize(packed, fmt, cols).to(getattr(owner, name).dtype)
        elif name in owner._parameters:
            del owner._parameters[name]
        else:
            delattr(owner, name)
    return len(found) - len(still_read)
