"""Quantize on compile (``--quantize int8|int4``): float weights become packed blocks while each rank's shard
is written, one tensor at a time.

Formats (``runtime/format/quant_section.py``):

- ``int8``: symmetric, one scale per output row: ``d = fp16(max|w_row| / 127)``, ``q = clamp(round(w / d),
  -127, 127)`` (``q = 0`` where ``d == 0``), stored as Q8_0 blocks (f16 ``d`` + 32 int8) with the row's ``d``
  repeated in every block of the row;
- ``int4_g{32,64,128}``: asymmetric per group of ``g`` inputs: ``d = fp16((max - min) / 15)``, ``m =
  fp16(min)``, ``q = clamp(round((w - m) / d), 0, 15)`` (``q = 0`` where ``d == 0``); ``w = d * q + m``.

``round`` is round-half-to-even (``torch.round``); the arithmetic is fp32.

Invariants:

- :func:`quantize_rows` of a ``[rows, cols]`` float tensor is the packed ``uint8`` ``[rows,
  fmt.packed_cols(cols)]`` whose dequantization (``runtime/kernels/quant.py``) is the formula's values;
  rows are independent, so a slice of rows quantizes to the same bytes as those rows of the whole;
- a rank's packed slice of the input dim is the slice of the whole rows' blocks: an ``int8`` row's scale is
  always the whole row's, an ``int4`` group never straddles a split (the plan cuts the input dim in whole
  blocks of the format);
- at most one float tensor (and its packed bytes, plus row-chunk temporaries) is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel
from tpcompile.runtime.errors import and_more
from tpcompile.runtime.format.quant_section import QuantFormat

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "QuantizeOptions",
    "quantize_format",
    "quantize_model",
    "quantize_rows",
]

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # Q4_1's layout: splits finest, and fits any model whose widths are multiples of 32
_INT4 = {32: QuantFormat.INT4_G32, 64: QuantFormat.INT4_G64, 128: QuantFormat.INT4_G128}
_CHUNK_ROWS = 1024  # rows quantized at a time (bounds the temporaries)

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``--quantize`` asks for: the packed format, and whether embedding tables are quantized too."""

    format: QuantFormat
    embeddings: bool = False


def quantize_format(kind: str, group_size: int | None) -> QuantFormat:
    """The format of ``--quantize kind [--group-size g]``.

    Raises:
        UsageError: an unknown kind, a group size with int8, or an unsupported group size.
    """
    if kind == "int8":
        if group_size is not None:
            raise UsageError("--group-size applies to --quantize int4 only (int8 has one scale per row)")
        return QuantFormat.INT8
    if kind != "int4":
        raise UsageError(f"--quantize must be int8 or int4 (got {kind})")
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g not in _INT4:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} (got {g})")
    return _INT4[g]


def _half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 values (rounded) and their two little-endian bytes: ``([...] f32, [..., 2] u8)``."""
    h = x.to(torch.float16)
    return h.to(torch.float32), h.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _int8(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    d, d_bytes = _half(w.abs().amax(dim=1) / 127)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d[:, None] == 0, 0.0, torch.round(w / safe[:, None]).clamp_(-127, 127))
    q8 = q.to(torch.int8).view(torch.uint8).reshape(rows, cols // 32, 32)
    scales = d_bytes.reshape(rows, 1, 2).expand(rows, cols // 32, 2)
    return torch.cat([scales, q8], dim=2).reshape(rows, -1)


def _int4(w: torch.Tensor, g: int) -> torch.Tensor:
    rows, cols = w.shape
    groups = w.reshape(rows, cols // g, g)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    d, d_bytes = _half((hi - lo) / 15)
    m, m_bytes = _half(lo)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((groups - m[..., None]) / safe[..., None]).clamp_(0, 15)
    q = torch.where(d[..., None] == 0, 0.0, q).to(torch.uint8)
    sub = q.reshape(rows, cols // g, g // 32, 2, 16)  # per sub-block of 32: weights 0..15, 16..31
    nibbles = (sub[..., 0, :] | (sub[..., 1, :] << 4)).reshape(rows, cols // g, g // 2)
    return torch.cat([d_bytes, m_bytes, nibbles], dim=2).reshape(rows, -1)


def quantize_rows(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The packed ``uint8`` ``[rows, fmt.packed_cols(cols)]`` of the float ``[rows, cols]`` weight ``w``
    (``cols`` a multiple of ``fmt.block``; see the module docstring for the formulas)."""
    rows, cols = w.shape
    assert cols % fmt.block == 0, f"{cols} inputs are not whole blocks of {fmt.block}"
    out = torch.empty(rows, fmt.packed_cols(cols), dtype=torch.uint8)
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = w[start : start + _CHUNK_ROWS].to(torch.float32)
        out[start : start + chunk.shape[0]] = (
            _int8(chunk) if fmt is QuantFormat.INT8 else _int4(chunk, fmt.block)
        )
    return out


def _eligible(captured: CapturedModel, embeddings: bool, block: int) -> tuple[list[str], list[str]]:
    """The stored 2-D float weights read only as a linear's weight (or, with ``embeddings``, also as an
    embedding table), and those of them whose input width is not whole blocks (left as floats)."""
    kept: list[str] = []
    misfit: list[str] = []
    for node, name in captured.state_names().items():
        val = node.meta.get("val")
        if name in captured.zero_state or not isinstance(val, torch.Tensor) or val.dim() != 2:
            continue
        if (
            not val.dtype.is_floating_point
            or not node.users
            or not all(_reads_as_weight(u, node, embeddings) for u in node.users)
        ):
            continue
        (kept if int(val.shape[1]) % block == 0 else misfit).append(name)
    return kept, misfit


def _reads_as_weight(user: fx.Node, node: fx.Node, embeddings: bool) -> bool:
    if user.op != "call_function":
        return False
    if user.target is _LINEAR:
        return len(user.args) > 1 and user.args[1] is node and user.args[0] is not node
    return embeddings and user.target is _EMBEDDING and user.args[0] is node


def quantize_model(captured: CapturedModel, opts: QuantizeOptions) -> None:
    """Offer the linear weights of ``captured`` (and, with ``opts.embeddings``, its embedding tables) packed
    in ``opts.format``, quantized when a rank's shard reads them; weights left as floats (input width not
    whole blocks) are named in ``captured.warnings``.

    Raises:
        UsageError: the source is already quantized (a GGUF file holding quantized tensors).
    """
    if captured.packed or captured.unpacked:
        count = len(captured.packed) + len(captured.unpacked)
        raise UsageError(
            f"{captured.source} is already quantized ({count} tensors); --quantize applies to float "
            "checkpoints (add --dequantize to requantize its dequantized weights)"
        )
    fmt = opts.format
    names, misfit = _eligible(captured, opts.embeddings, fmt.block)
    if not names:
        raise UsageError(
            f"--quantize {fmt.value}: {captured.source} has no linear weight whose input width is a multiple "
            f"of {fmt.block}"
        )
    captured.packed = dict.fromkeys(sorted(names), fmt)
    captured.read_packed = _packed_reader(captured, fmt)
    captured.float_fix = "a smaller --group-size" if fmt.multi_block_groups else "drop --quantize"
    if misfit:
        more = and_more(misfit)
        captured.warnings.append(
            f"{len(misfit)} weights stay floats: their input width is not a multiple of {fmt.block} "
            f"({sorted(misfit)[0]}{more})"
        )


def _packed_reader(captured: CapturedModel, fmt: QuantFormat) -> Callable[[str, int, int, int], torch.Tensor]:
    read_slice, read_tensor = captured.read_slice, captured.read_tensor

    def floats(name: str, dim: int, start: int, length: int) -> torch.Tensor:
        if read_slice is not None:
            return read_slice(name, dim, start, length)
        return read_tensor(name).narrow(dim, start, length)

    def read_packed(name: str, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:  # rows quantize independently
            return quantize_rows(floats(name, 0, start, length), fmt)
        if dim != 1 or start % fmt.block or length % fmt.block:
            raise UnsupportedModelError(
                f"slice [{start}:{start + length}] of dim {dim} of {name} cuts its {fmt.value} blocks"
            )
        if fmt is not QuantFormat.INT8:  # whole groups: the slice quantizes alone
            return quantize_rows(floats(name, 1, start, length), fmt)
        # int8: the whole rows, so that each row's scale is the whole row's; then the slice's blocks
        packed = quantize_rows(read_tensor(name), fmt)
        return packed[:, fmt.packed_cols(start) : fmt.packed_cols(start + length)].contiguous()

    return read_packed
