"""Tensors in memory the kernel is asked to back with huge pages (``MADV_HUGEPAGE``).

A decode step streams each weight once, and with 4 KiB pages a 47 MiB rank crosses ~12,000 of them a step:
translation misses, and prefetch streams that restart at each page boundary. A rank's mapped shard files
may already get large pages from the page cache (ext4 here: ~11.8 GB/s read on one thread, as with huge
pages, against ~10.2 for ordinary anonymous memory), but weights the runtime rewrites at load (the
interleaved quantized rows) are anonymous memory. The tensors made here share one private anonymous
mapping, aligned to 2 MiB and advised before it is written, so that Linux backs it with 2 MiB pages where
its transparent huge pages are enabled (``always`` or ``madvise``); elsewhere they are ordinary memory.

Invariant: ``empty_in_huge_pages(like)[i]`` has the dtype and shape of ``like[i]``, holds zeros, is
contiguous, overlaps no other and owns its memory (the mapping lives as long as any of the tensors); the
pages are backed when first written (the caller's copy), so a rank holds its weights once, not twice,
while they are placed.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence

import torch

__all__ = ["empty_in_huge_pages"]

_HUGE_PAGE = 2 * 2**20
_ALIGN = 64  # each tensor starts on a cache line


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def empty_in_huge_pages(like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed CPU tensors shaped like each of ``like``, one after the other in a single mapping advised for
    huge pages."""
    sizes = [t.numel() * t.element_size() for t in like]
    total = sum(_padded(n) for n in sizes)
    if not total:
        return [torch.zeros(t.shape, dtype=t.dtype) for t in like]
    # whole huge pages from a 2 MiB boundary on; private: Linux gives shared anonymous memory (mmap's
    # default) huge pages only where shmem allows them
    size = -(-total // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages: ordinary pages
            region.madvise(advice)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    at = -whole.data_ptr() % _HUGE_PAGE
    tensors = []
    for t, nbytes in zip(like, sizes, strict=True):
        tensors.append(whole[at : at + nbytes].view(t.dtype).view(t.shape))
        at += _padded(nbytes)
    return tensors
