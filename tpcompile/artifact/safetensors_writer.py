"""A streaming safetensors writer: tensors are written one at a time, so writing a rank's shard never holds
more than one tensor in memory. The file is byte-identical for identical inputs (sorted keys, no timestamps).
Any shape safetensors allows is written, 0-dim (shape ``[]``) included.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tpcompile.artifact.writer import writing

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    read: Callable[[str], torch.Tensor],
) -> int:
    """Write tensors named in ``specs`` (name, dtype, shape), reading each with ``read`` only when its turn
    comes. Returns the number of data bytes."""
    entries = sorted(specs)
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPE_CODES:
            raise TypeError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    with writing(path), path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            t = read(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor {name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
            data = t.detach().contiguous().cpu().reshape(-1)  # a 0-dim tensor is one element
            if data.numel():  # write the tensor's own bytes: no second copy of the largest tensor
                raw_bytes = data.view(torch.uint8) if data.dtype != torch.bool else data
                f.write(raw_bytes.numpy().data)
            del t, data
    return offset
