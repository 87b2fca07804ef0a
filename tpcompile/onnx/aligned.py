"""Rewriting a rank's ``weights.safetensors`` so that onnxruntime memory-maps the segments' weights.

ONNX external data offsets SHOULD be multiples of 4096 (onnx ExternalData.md), and onnxruntime releases
before ~1.17 memory-map a CPU initializer only when its offset is a multiple of the allocation granularity
(the page size on Linux, 64 KiB on Windows), reading a private copy otherwise (1.32 maps unaligned data too).
Safetensors allows no holes between tensors, so the gaps are filled with ``uint8`` tensors named
``__tpcompile_pad_{i}`` (the ONNX segments never read them) and the JSON header is padded with spaces.
Invariant: afterwards every other tensor starts at an absolute file offset that is a multiple of
``LARGE`` (tensors of at least ``LARGE`` bytes) or ``SMALL`` (smaller ones), with the same bytes as before,
and the file is still a valid safetensors file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

PAD_PREFIX = "__tpcompile_pad_"
SMALL = 4096  # the page size: memory-mapped on Linux
LARGE = 65536  # Windows' allocation granularity: memory-mapped everywhere
_CHUNK = 1 << 22


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _alignment(size: int) -> int:
    return LARGE if size >= LARGE else SMALL


def is_aligned(path: Path) -> bool:
    """Whether every non-padding tensor of ``path`` already starts at its aligned absolute offset."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return all(
        (8 + n + e["data_offsets"][0]) % _alignment(e["data_offsets"][1] - e["data_offsets"][0]) == 0
        for name, e in header.items()
        if name != "__metadata__" and not name.startswith(PAD_PREFIX)
    )


def align_safetensors(path: Path) -> None:
    """Rewrite ``path`` in place (through a temporary file) with aligned tensor data (module docstring)."""
    if is_aligned(path):
        return
    with path.open("rb") as src:
        (n,) = struct.unpack("<Q", src.read(8))
        old: dict[str, Any] = json.loads(src.read(n))
        base = 8 + n
        meta = old.pop("__metadata__", None)
        tensors = sorted(
            ((name, e) for name, e in old.items() if not name.startswith(PAD_PREFIX)),
            key=lambda item: (item[1]["data_offsets"][0], item[0]),
        )
        header: dict[str, Any] = {} if meta is None else {"__metadata__": meta}
        layout: list[tuple[int, int, int]] = []  # (old absolute offset, length, new relative offset)
        pos = 0
        for name, e in tensors:
            begin, end = int(e["data_offsets"][0]), int(e["data_offsets"][1])
            start = _round_up(pos, _alignment(end - begin))  # relative to an offset aligned to LARGE
            if start > pos:
                header[f"{PAD_PREFIX}{len(layout)}"] = {
                    "dtype": "U8",
                    "shape": [start - pos],
                    "data_offsets": [pos, start],
                }
            header[name] = {**e, "data_offsets": [start, start + end - begin]}
            layout.append((base + begin, end - begin, start))
            pos = start + end - begin
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        data_start = _round_up(8 + len(raw), LARGE)
        raw += b" " * (data_start - 8 - len(raw))
        tmp = path.with_name(path.name + ".aligning")
        with tmp.open("wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            for old_offset, length, start in layout:
                dst.write(b"\0" * (data_start + start - dst.tell()))
                src.seek(old_offset)
                left = length
                while left:
                    chunk = src.read(min(left, _CHUNK))
                    if not chunk:
                        raise OSError(f"{path} ends inside a tensor")
                    dst.write(chunk)
                    left -= len(chunk)
    os.replace(tmp, path)
