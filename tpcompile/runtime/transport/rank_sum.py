"""The sum over ranks that every transport computes, and the process-group all-reduce built on it.

Half-precision payloads (``tpcompile --comm-dtype bf16|fp16``, or a bf16/fp16 model) cross between ranks in
16 bits but are added in float32: ``rank_order_sum`` adds the ranks' parts in rank order in float32 and
rounds once to the payload dtype (other dtypes are added in their own dtype, as before), and the C++
transport (``kernels/cpu_ops.cpp``) does exactly the same additions.

Invariants: every rank that holds the same parts gets a bit-identical result; ``group_all_reduce`` gives
every rank of the group that result: a half payload is all-gathered and summed locally (gloo and NCCL would
add in 16 bits, rounding after every addition), anything else is the group's own all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["HALF_DTYPES", "group_all_reduce", "rank_order_sum"]

#: Payload dtypes whose sum over ranks accumulates in float32.
HALF_DTYPES = (torch.bfloat16, torch.float16)
_C10D = torch.ops._c10d_functional


def rank_order_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in rank order, as a new tensor of the parts' dtype (float32 additions
    for half payloads, rounded once)."""
    if len(parts) == 1:
        return parts[0].clone()
    if parts[0].dtype not in HALF_DTYPES:
        acc = torch.add(parts[0], parts[1])
        for part in parts[2:]:
            acc += part
        return acc
    acc = parts[0].float()
    for part in parts[1:]:
        acc += part
    return acc.to(parts[0].dtype)


def group_all_reduce(t: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    """The sum of ``t`` over the ``world`` ranks of process group ``group_name`` (see the invariants)."""
    if t.dtype not in HALF_DTYPES:
        return _C10D.wait_tensor(_C10D.all_reduce(t, "sum", group_name))
    rows = t.detach().contiguous().reshape(1, -1)
    gathered = _C10D.wait_tensor(_C10D.all_gather_into_tensor(rows, world, group_name))
    return rank_order_sum(gathered.unbind(0)).reshape(t.shape)
