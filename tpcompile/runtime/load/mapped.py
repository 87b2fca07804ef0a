"""Tensors of a safetensors file mapped into memory instead of read: pages load when first touched and stay
in the page cache, shared with every other process that maps the same file.

Invariant: ``map_safetensors(path)[name]`` equals ``safetensors.torch.load_file(path)[name]`` (same dtype,
shape and values) and owns no copy of the data: it is a copy-on-write view of the file, so writing into
it never changes the file. The mapping lives as long as any of its tensors.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

__all__ = ["map_safetensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, backed by a private memory map of it.

    Raises:
        ValueError: the file is not a safetensors file this function can map (a dtype it does not know,
            offsets outside the file).
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        size = f.seek(0, 2)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    start = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        lo, hi = entry["data_offsets"]
        if dtype is None or start + hi > size or lo > hi:
            raise ValueError(f"{path}: cannot map tensor {name} ({entry['dtype']}, bytes {lo}-{hi})")
        shape = tuple(entry["shape"])
        if hi == lo or mapped is None:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=hi - lo, offset=start + lo)
        tensors[name] = flat.view(dtype).reshape(shape)
    return tensors
