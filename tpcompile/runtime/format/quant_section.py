"""Quantized weights in an artifact (``extra.quant``): which stored tensors a rank shard holds packed.

A quantized weight ``W`` of logical shape ``[rows, cols]`` (rows: output features, cols: input features)
is stored in each rank's shard under ``W + PACKED_SUFFIX`` as a ``uint8`` tensor ``[local_rows,
local_cols // block * block_bytes]``: each row is the row's blocks of ``block`` consecutive input features,
``block_bytes`` bytes each, in the layout of its format (GGUF's block layouts as llama.cpp writes them;
``int8``/``int4``: see ``QuantFormat``). The program still names ``W`` with its logical (float) local
shape; the runtime binds the packed bytes to the ops that read ``W`` (``runtime/load/quantized.py``).

``{"tensors": {"<name>": {"format": "q4_1", "block": 32, "block_bytes": 20, "bytes": [r0, r1, ...]}},
"dequantized": {"<name>": "<format>"}}``: ``bytes`` is each rank's packed size; ``dequantized`` names the
source tensors of a quantized checkpoint that were stored as floats (no kernel for their format, or
``--dequantize``).

Invariants: a rank's slice of a packed tensor is always whole blocks (a row-parallel split cuts the input
dim only at block boundaries); the enum is the one name of a format across compiler and runtime. Standard
library only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ManifestError

__all__ = [
    "COMPILE_FORMATS",
    "GGUF_FORMATS",
    "PACKED_SUFFIX",
    "QuantFormat",
    "QuantSection",
    "QuantTensor",
    "quant_section",
]

PACKED_SUFFIX = ".packed"


class QuantFormat(enum.Enum):
    """A block-quantized weight layout; ``value`` is its name in the manifest."""

    Q8_0 = "q8_0"  # 32 weights: f16 scale d, 32 x int8 q;            w = d * q
    Q4_0 = "q4_0"  # 32 weights: f16 d, 16 bytes of nibbles;          w = d * (q - 8)
    Q4_1 = "q4_1"  # 32 weights: f16 d, f16 m, 16 bytes of nibbles;   w = d * q + m
    # k-quants: 256 weights in 8 or 16 sub-blocks with 6- or 8-bit sub-block scales (llama.cpp's layouts)
    Q4_K = "q4_k"  # f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    Q5_K = "q5_k"  # as q4_k, plus 32 bytes of fifth bits
    Q6_K = "q6_k"  # 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16 d
    # quantized on compile (``--quantize``, ``frontend/quantize.py``), not GGUF types:
    INT8 = "int8"  # per output row symmetric: Q8_0's blocks, the row's one scale in every block
    # groupwise asymmetric (Q4_1's formula w = d * q + m): per group f16 d, f16 m, then g/32 Q4_1 nibble
    # sub-blocks of 16 bytes (byte j: weight j low nibble, weight j + 16 high); g = 32 is Q4_1's layout
    INT4_G32 = "int4_g32"
    INT4_G64 = "int4_g64"
    INT4_G128 = "int4_g128"

    @property
    def block(self) -> int:
        """Input features per block (the split unit of a row-parallel cut)."""
        return _LAYOUT[self][0]

    @property
    def block_bytes(self) -> int:
        return _LAYOUT[self][1]

    @property
    def multi_block_groups(self) -> bool:
        """An int4 format whose group spans several 32-weight nibble sub-blocks (g64, g128): one scale and
        minimum per group; the kernels decode it group by group."""
        return self in (QuantFormat.INT4_G64, QuantFormat.INT4_G128)

    @property
    def code(self) -> int:
        """The integer the kernels take (an op argument cannot be an enum); ``quant_ops.cpp``'s ``Format``
        enum lists the same codes."""
        return list(QuantFormat).index(self)

    @classmethod
    def from_code(cls, code: int) -> QuantFormat:
        return list(cls)[code]

    def packed_cols(self, cols: int) -> int:
        """Bytes of one packed row of ``cols`` input features (a multiple of ``block``)."""
        return cols // self.block * self.block_bytes


_LAYOUT = {
    QuantFormat.Q8_0: (32, 34),
    QuantFormat.Q4_0: (32, 18),
    QuantFormat.Q4_1: (32, 20),
    QuantFormat.Q4_K: (256, 144),
    QuantFormat.Q5_K: (256, 176),
    QuantFormat.Q6_K: (256, 210),
    QuantFormat.INT8: (32, 34),
    QuantFormat.INT4_G32: (32, 20),
    QuantFormat.INT4_G64: (64, 36),
    QuantFormat.INT4_G128: (128, 68),
}

#: The formats ``--quantize`` writes (the others are GGUF's block types, read from a file).
COMPILE_FORMATS = (QuantFormat.INT8, QuantFormat.INT4_G32, QuantFormat.INT4_G64, QuantFormat.INT4_G128)
#: GGUF's block types with a kernel (the enum's names are GGML's type names).
GGUF_FORMATS = tuple(f for f in QuantFormat if f not in COMPILE_FORMATS)


@dataclass(frozen=True)
class QuantTensor:
    """One packed weight: its format and each rank's packed bytes."""

    format: QuantFormat
    bytes: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        f = self.format
        return {"format": f.value, "block": f.block, "block_bytes": f.block_bytes, "bytes": list(self.bytes)}


@dataclass(frozen=True)
class QuantSection:
    tensors: Mapping[str, QuantTensor]
    dequantized: Mapping[str, str]  # name -> source format, stored as floats

    def to_json(self) -> dict[str, Any]:
        return {
            "tensors": {n: t.to_json() for n, t in sorted(self.tensors.items())},
            "dequantized": dict(sorted(self.dequantized.items())),
        }


def quant_section(extra: Mapping[str, Any], where: str) -> QuantSection | None:
    """``extra.quant`` of a manifest, or None when nothing in the artifact is stored quantized.

    Raises:
        ManifestError: the section is malformed or names a format this runtime does not know.
    """
    data = extra.get("quant")
    if data is None:
        return None
    try:
        tensors = {}
        for name, t in data["tensors"].items():
            fmt = QuantFormat(t["format"])
            if int(t["block"]) != fmt.block or int(t["block_bytes"]) != fmt.block_bytes:
                raise ValueError(f"{name}: block layout differs from {fmt.value}'s")
            tensors[str(name)] = QuantTensor(fmt, tuple(int(b) for b in t["bytes"]))
        dequantized = {str(k): str(v) for k, v in data.get("dequantized", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{where}: malformed extra.quant ({exc}); recompile the artifact") from exc
    return QuantSection(tensors, dequantized)
