"""``runtime/load/huge_pages.py``: tensors in one private mapping advised for huge pages."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tpcompile.runtime.load.huge_pages import empty_in_huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_enabled() -> bool:
    """Whether Linux gives huge pages to memory advised for them (transparent huge pages ``always`` or
    ``madvise``)."""
    return THP_MODE.is_file() and re.search(r"\[(always|madvise)\]", THP_MODE.read_text()) is not None


def mapping_of(address: int) -> dict[str, str]:
    """The fields of this process's mapping (``/proc/self/smaps``) that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
            if inside:
                fields = {"range": head.group(0).strip()}
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    assert fields, f"no mapping holds {address:#x}"
    return fields


def test_tensors_are_zeroed_contiguous_and_apart() -> None:
    like = [
        torch.ones(5, 7, dtype=torch.uint8),
        torch.ones(4, 3).t(),  # not contiguous: the copy is
        torch.ones(0, 3, dtype=torch.float16),
        torch.ones(3 * 2**20, dtype=torch.uint8),  # a few huge pages
    ]
    got = empty_in_huge_pages(like)
    assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in like]
    assert all(t.is_contiguous() and not t.any() for t in got)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in got if t.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert all(t.data_ptr() % 64 == 0 for t in got)
    big = got[3]
    del got, like
    big.fill_(7)  # the mapping outlives the list that made it
    assert int(big.sum()) == 7 * 3 * 2**20


def test_tensors_are_backed_by_huge_pages_where_linux_allows() -> None:
    (big,) = empty_in_huge_pages([torch.empty(6 * 2**20, dtype=torch.uint8)])
    big.fill_(1)
    mapping = mapping_of(big.data_ptr())
    assert big.data_ptr() % (2 * 2**20) == 0  # starts on a huge page
    if thp_enabled():  # eligible, whether or not a huge page is free at the moment
        assert mapping["THPeligible"] == "1", mapping
    else:
        assert mapping["THPeligible"] == "0", mapping
