"""Ops on weights kept in a quantized block layout (``format/quant_section.py``): ``tpcompile::quant_linear``
(``x @ W.T + b``), ``tpcompile::quant_embedding`` (rows of a table) and ``tpcompile::quant_dequantize``.

Each op is defined here with a fake kernel (so ``torch.export`` and AOTInductor treat it as opaque) and a
Python kernel for every device, which decodes the packed weight with torch ops and calls ``F.linear`` /
indexing. Loading ``quant_ops.cpp`` (built with the host's C++ compiler against the running torch on first
use, cached per source, CPU and torch version like ``cpu_ops``) adds CPU kernels that decode blocks on the
fly (see the source).

Invariants:
- :func:`dequantize` is the reference: bit for bit the values ``gguf.quants.dequantize`` gives for the same
  blocks, in fp32 (``int8`` / ``int4_g*``, written by ``--quantize``: ``d * q`` and ``d * q + m``); every
  kernel computes with those values (fp32 products and sums; the interleaved decode as ``d * sum(q * x) +
  m * sum(x)`` per block, a nibble row's ``sum(q * x)`` from its group's whole bytes), so results agree with
  the dequantized model to fp32 round-off;
- :func:`interleave_rows` only reorders bytes: :func:`deinterleave_rows` gives the packed tensor back;
- a failed build is not an error: the Python kernels run (``TPCOMPILE_CPU_KERNELS=0`` skips the build).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..format.quant_section import QuantFormat
from .cpp_library import load_cpp_library

__all__ = [
    "C_SHIMS",
    "ROWS_INTERLEAVED",
    "deinterleave_rows",
    "dequantize",
    "interleave_rows",
    "interleaves",
    "load_quant_ops",
    "op_code",
    "quant_ops_loaded",
]

#: The C functions through which a native program calls the ops that read packed weights, by op name (as
#: ``cpu_ops.C_SHIMS``; implemented at the end of ``quant_ops.cpp``).
C_SHIMS = {
    "quant_linear": "AOTITorchError aoti_torch_cpu_quant_linear(AtenTensorHandle x, AtenTensorHandle packed, "
    "AtenTensorHandle* bias, int64_t format, int64_t in_features, AtenTensorHandle* ret0)",
    "quant_embedding": "AOTITorchError aoti_torch_cpu_quant_embedding(AtenTensorHandle packed, "
    "AtenTensorHandle ids, int64_t format, int64_t in_features, AtenTensorHandle* ret0)",
}

#: An op's format code with this bit set: the packed rows are interleaved in groups (:func:`interleave_rows`;
#: ``quant_ops.cpp``'s ``kRowsInterleaved``).
ROWS_INTERLEAVED = 1 << 8
#: Output rows of a kernel's vector (one a lane): a group holds one (int8 blocks) or two (nibbles) a lane.
_LANES = 8

_SOURCE = Path(__file__).with_name("quant_ops.cpp")
_LOADED: bool | None = None


def dequantize(packed: torch.Tensor, fmt: QuantFormat, cols: int) -> torch.Tensor:
    """The fp32 ``[rows, cols]`` weight held by ``packed`` (``[rows, cols // block * block_bytes]`` uint8)."""
    rows = packed.shape[0]
    blocks = packed.reshape(rows, cols // fmt.block, fmt.block_bytes)

    def half(lo: int) -> torch.Tensor:
        return blocks[..., lo : lo + 2].contiguous().view(torch.float16).to(torch.float32)

    if fmt in _K_QUANTS:
        return _K_QUANTS[fmt](blocks.reshape(-1, fmt.block_bytes)).reshape(rows, cols)
    if fmt.multi_block_groups:  # f16 d, f16 m, then block/32 Q4_1 nibble sub-blocks
        nibbles = blocks[..., 4:].reshape(rows, cols // fmt.block, fmt.block // 32, 16)
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.float32)
        q = q.reshape(rows, cols // fmt.block, fmt.block)
        return (half(0) * q + half(2)).reshape(rows, cols)
    if fmt in (QuantFormat.Q8_0, QuantFormat.INT8):
        q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32)
        w = half(0) * q
    else:
        q4_1 = fmt in (QuantFormat.Q4_1, QuantFormat.INT4_G32)
        nibbles = blocks[..., 4:] if q4_1 else blocks[..., 2:]
        q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.float32)
        w = half(0) * q + half(2) if q4_1 else half(0) * (q - 8)
    return w.reshape(rows, cols)


#: The formats with a row-interleaved layout: blocks of 32 weights with an f16 d (and m) ahead of the quants.
_INTERLEAVED = (QuantFormat.Q8_0, QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.INT8, QuantFormat.INT4_G32)


def interleaves(fmt: QuantFormat) -> bool:
    """Whether ``fmt`` has a row-interleaved layout (:func:`interleave_rows`)."""
    return fmt in _INTERLEAVED


def op_code(fmt: QuantFormat, interleaved: bool = False) -> int:
    """The ``format`` argument of the ops for a weight of ``fmt``, its rows interleaved or not."""
    return fmt.code | (ROWS_INTERLEAVED if interleaved else 0)


def _group_fields(fmt: QuantFormat) -> tuple[int, int]:
    """(bytes of a block's header: f16 d, and f16 m; bytes of its quants)."""
    header = 4 if fmt in (QuantFormat.Q4_1, QuantFormat.INT4_G32) else 2
    return header, fmt.block_bytes - header


def _nibbles(fmt: QuantFormat) -> bool:
    return fmt not in (QuantFormat.Q8_0, QuantFormat.INT8)


def _group_rows(fmt: QuantFormat) -> int:
    """Rows a group of :func:`interleave_rows` holds for ``fmt``: one a lane, two for the nibble formats."""
    return 2 * _LANES if _nibbles(fmt) else _LANES


def interleave_rows(packed: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``packed`` (``[rows, blocks * block_bytes]``, a format that :func:`interleaves`) with its rows
    interleaved in groups (8 rows; 16 for the nibble formats), the layout the CPU decode kernel reads fastest
    (``quant_ops.cpp``, ``decode_groups``): each group keeps its rows' bytes, arranged block by block as the
    rows' f16 d, their f16 m (Q4_1), then 8 bytes for each weight j of the block: weight j of the 8 rows
    (Q8_0), or, for nibbles, byte l holding weight j of the group's row l in its low nibble and of row
    l + 8 in its high one. The last rows (fewer than a group) stay as they are."""
    rows, width = packed.shape
    size = _group_rows(fmt)
    grouped = rows // size * size
    if not grouped:
        return packed
    header, _ = _group_fields(fmt)
    blocks = packed[:grouped].reshape(grouped // size, size, -1, fmt.block_bytes)
    groups, blocks_per_row = blocks.shape[0], blocks.shape[2]
    # the f16 scales [groups, rows, blocks, 2] -> [groups, blocks, rows * 2] (the rows' halves side by side)
    scales = [
        blocks[..., at : at + 2].permute(0, 2, 1, 3).reshape(groups, blocks_per_row, -1)
        for at in range(0, header, 2)
    ]
    quants = blocks[..., header:]
    if _nibbles(fmt):  # weight j of each row (the file's byte i holds weights i and i + 16), then paired
        weights = torch.cat([quants & 15, quants >> 4], dim=-1)
        quants = weights[:, :_LANES] | (weights[:, _LANES:] << 4)
    # [groups, lanes, blocks, j] -> [groups, blocks, j, lanes]: weight j of the lanes side by side
    lanes = quants.permute(0, 2, 3, 1).reshape(groups, blocks_per_row, -1)
    interleaved = torch.cat([*scales, lanes], dim=-1).reshape(grouped, width)
    return torch.cat([interleaved, packed[grouped:]]).contiguous()


def deinterleave_rows(packed: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The inverse of :func:`interleave_rows`."""
    rows, width = packed.shape
    size = _group_rows(fmt)
    grouped = rows // size * size
    if not grouped:
        return packed
    header, _ = _group_fields(fmt)
    groups = packed[:grouped].reshape(grouped // size, width // fmt.block_bytes, -1)
    lead = groups.shape[:2]
    scales = [
        groups[..., 2 * size * i : 2 * size * (i + 1)].reshape(*lead, size, 2).transpose(1, 2)
        for i in range(header // 2)
    ]  # [groups, rows, blocks, 2]
    # [groups, lanes, blocks, j]
    lanes = groups[..., size * header :].reshape(*lead, fmt.block, _LANES).permute(0, 3, 1, 2)
    if _nibbles(fmt):  # lanes' low nibbles are rows 0-7, high nibbles rows 8-15; then the file's pairing
        weights, half = torch.cat([lanes & 15, lanes >> 4], dim=1), fmt.block // 2
        lanes = weights[..., :half] | (weights[..., half:] << 4)
    blocks = torch.cat([*scales, lanes], dim=-1)  # [groups, rows, blocks, block_bytes]
    return torch.cat([blocks.reshape(grouped, width), packed[grouped:]]).contiguous()


def _from_op_code(code: int, packed: torch.Tensor) -> tuple[QuantFormat, torch.Tensor]:
    """The format an op's ``format`` argument names, and ``packed`` with its rows in order."""
    fmt = QuantFormat.from_code(code & ~ROWS_INTERLEAVED)
    return fmt, deinterleave_rows(packed, fmt) if code & ROWS_INTERLEAVED else packed


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit sub-block scales and mins packed in 12 bytes (q4_k, q5_k)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mins


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # [n, 144] -> [n, 256], as gguf.quants.Q4_K
    n = b.shape[0]
    sc, mins = _scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mins.to(torch.float32)).reshape(n, 8, 1)
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # [n, 176] -> [n, 256], as gguf.quants.Q5_K
    n = b.shape[0]
    sc, mins = _scale_min(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mins.to(torch.float32)).reshape(n, 8, 1)
    ql = b[:, 48:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x01).reshape(n, 8, 32) << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # [n, 210] -> [n, 256], as gguf.quants.Q6_K
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = b[:, 0:128].reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> shifts
    q = (ql & 0x0F).reshape(n, 8, 32) | ((qh & 0x03).reshape(n, 8, 32) << 4)
    q = (q.to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, 256)


_K_QUANTS = {QuantFormat.Q4_K: _q4_k, QuantFormat.Q5_K: _q5_k, QuantFormat.Q6_K: _q6_k}


@torch.library.custom_op("tpcompile::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, format: int, in_features: int
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the weight ``W`` that ``packed`` holds in format ``format`` (its
    :func:`op_code`)."""
    fmt, packed = _from_op_code(format, packed)
    weight = dequantize(packed, fmt, in_features).to(x.dtype)
    return F.linear(x, weight, bias)


@quant_linear.register_fake
def _quant_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, format: int, in_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("tpcompile::quant_embedding", mutates_args=())
def quant_embedding(packed: torch.Tensor, ids: torch.Tensor, format: int, in_features: int) -> torch.Tensor:
    """The rows ``ids`` of the table that ``packed`` holds, decoded to fp32 (``F.embedding``)."""
    fmt, packed = _from_op_code(format, packed)
    table = dequantize(packed.index_select(0, ids.reshape(-1)), fmt, in_features)
    return table.reshape(*ids.shape, in_features)


@quant_embedding.register_fake
def _quant_embedding_fake(
    packed: torch.Tensor, ids: torch.Tensor, format: int, in_features: int
) -> torch.Tensor:
    return packed.new_empty((*ids.shape, in_features), dtype=torch.float32)


@torch.library.custom_op("tpcompile::quant_dequantize", mutates_args=())
def quant_dequantize(packed: torch.Tensor, format: int, in_features: int) -> torch.Tensor:
    """The whole weight decoded to fp32 (:func:`dequantize`)."""
    fmt, packed = _from_op_code(format, packed)
    return dequantize(packed, fmt, in_features)


@quant_dequantize.register_fake
def _quant_dequantize_fake(packed: torch.Tensor, format: int, in_features: int) -> torch.Tensor:
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.float32)


def load_quant_ops() -> bool:
    """Build (once per host and torch) and load the CPU kernels; False where they cannot be had."""
    global _LOADED
    if _LOADED is None:
        _LOADED = load_cpp_library(_SOURCE, "quant-ops")
    return _LOADED


def quant_ops_loaded() -> bool:
    """True once :func:`load_quant_ops` has loaded the library in this process."""
    return bool(_LOADED)
