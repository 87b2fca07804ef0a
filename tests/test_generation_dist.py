"""Token choice and output gathering across real gloo processes (torch.multiprocessing, no mocks).

Each spawned rank holds its uneven slice of a global tensor that every rank can rebuild, and checks its
results against plain single-tensor torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpcompile.runtime.format import Replicate, Shard
from tpcompile.runtime.launch.launcher import free_port
from tpcompile.runtime.lm.sampling import (
    SamplingConfig,
    VocabShard,
    choose_token,
    distributed_argmax,
    warp_logits,
)
from tpcompile.runtime.transport.collectives import gather_sharded


def _tie_logits(sizes: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Rows with exact ties across rank boundaries, within one rank, everywhere, plus NaN and random rows."""
    total = sum(sizes)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(9, total, generator=gen).to(dtype)
    boundary = sizes[0]  # first id of rank 1
    rows[0, boundary - 1] = rows[0, boundary] = 9.0  # across the rank 0 / rank 1 boundary
    rows[1, boundary + 1] = rows[1, boundary + 2] = 9.0  # within rank 1
    rows[2, [1, boundary + 1, total - 1]] = 9.0  # in several ranks, lowest first
    rows[3, total - 1] = 9.0  # unique max in the last rank
    rows[4] = 1.0  # all equal
    rows[5, boundary + 1] = float("nan")  # NaN counts as the maximum in torch.argmax
    rows[6] = float("-inf")
    rows[6, total - 2 :] = 5.0  # the last rank(s), tied
    rows[7, [2, boundary + 1]] = float("nan")  # NaNs on two ranks: the first wins
    return rows


def _slice(full: torch.Tensor, placement: Shard, rank: int) -> torch.Tensor:
    start = placement.offset(rank)
    return full[..., start : start + placement.sizes[rank]]


def _ranks(rank: int, world: int, port: int, sizes: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        placement = Shard(dim=-1, sizes=tuple(sizes))
        total = sum(sizes)
        # 1. distributed greedy argmax == torch.argmax over the concatenated logits, ties -> lowest id
        for dtype in (torch.float32, torch.bfloat16):
            full = _tie_logits(sizes, dtype)
            shard = VocabShard(placement, rank, total)
            got = distributed_argmax(_slice(full, placement, rank), shard)
            assert got.tolist() == full.argmax(dim=-1).tolist(), (dtype, got, full.argmax(dim=-1))
        # padding past vocab_size is never chosen, even when it holds the maximum
        full = _tie_logits(sizes, torch.float32)
        full[:, total - 1] = 100.0
        shard = VocabShard(placement, rank, total - 1)
        got = distributed_argmax(_slice(full, placement, rank), shard)
        assert got.tolist() == full[:, : total - 1].argmax(dim=-1).tolist()

        # 2. sampling: every rank gets rank 0's draw; same seed -> same tokens; top-k respected
        logits = torch.randn(1, total, generator=torch.Generator().manual_seed(11))
        local = _slice(logits, placement, rank)
        config = SamplingConfig(temperature=0.7, top_k=6, top_p=0.95, seed=5)

        program_output = Shard(dim=2, sizes=tuple(sizes))  # the manifest's placement of [B, T, V] logits

        def draw(seed: int) -> list[int]:
            gen = torch.Generator().manual_seed(seed if rank == 0 else rank + 99)
            shard = VocabShard(program_output, rank, total)
            return [choose_token(local, shard, config, gen) for _ in range(24)]

        first, again, other = draw(5), draw(5), draw(6)
        everyone: list[object] = [None] * world
        dist.all_gather_object(everyone, first)
        assert all(tokens == first for tokens in everyone), everyone
        assert again == first and other != first
        allowed = set(torch.topk(logits[0], 6).indices.tolist())
        assert set(first) <= allowed, (first, allowed)
        gen = torch.Generator().manual_seed(5)
        probs = warp_logits(logits, config).softmax(dim=-1)
        local_draws = [int(torch.multinomial(probs, 1, generator=gen)[0, 0]) for _ in range(24)]
        assert first == local_draws

        # 3. gathering uneven shards of an output back to the global tensor (middle dim and last dim)
        glob = torch.arange(2 * total * 3, dtype=torch.float32).reshape(2, total, 3)
        mid = Shard(dim=1, sizes=tuple(sizes))
        assert torch.equal(gather_sharded(_slice(glob.transpose(1, 2), mid, rank).transpose(1, 2), mid), glob)
        last = glob.transpose(1, 2).contiguous()  # [2, 3, total]
        assert torch.equal(gather_sharded(_slice(last, placement, rank), placement), last)
        rep = Replicate()
        assert gather_sharded(glob, rep) is glob
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[5, 3], [4, 2, 3]], ids=["tp2", "tp3"])
def test_distributed_token_choice_and_gather(sizes: list[int]) -> None:
    mp.spawn(_ranks, args=(len(sizes), free_port(), sizes), nprocs=len(sizes), join=True)


def _shared_memory_ranks(rank: int, world: int, port: int, sizes: list[int]) -> None:
    from tpcompile.runtime.kernels.compiled import bind_transport
    from tpcompile.runtime.kernels.cpu_ops import load_cpu_ops, shared_memory_argmax
    from tpcompile.runtime.transport.shm import ShmCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert load_cpu_ops()
        comm = ShmCommunicator.create(rank, world, timeout_s=5.0)
        bind_transport(dist.group.WORLD.group_name, world, comm)
        placement = Shard(dim=-1, sizes=tuple(sizes))
        total = sum(sizes)
        for dtype in (torch.float32, torch.bfloat16):
            full = _tie_logits(sizes, dtype)
            local = _slice(full, placement, rank)
            # the one-call C++ path is the one taken, and equals torch.argmax over the whole vocabulary
            native = shared_memory_argmax(local, local.shape[-1], placement.offset(rank), world)
            assert native is not None and native.tolist() == full.argmax(dim=-1).tolist(), (dtype, native)
            got = distributed_argmax(local, VocabShard(placement, rank, total))
            assert got.tolist() == full.argmax(dim=-1).tolist(), (dtype, got)
        full = _tie_logits(sizes, torch.float32)
        full[:, total - 1] = 100.0  # padding past vocab_size: never chosen
        got = distributed_argmax(_slice(full, placement, rank), VocabShard(placement, rank, total - 1))
        assert got.tolist() == full[:, : total - 1].argmax(dim=-1).tolist()
        # a vocabulary that ends inside rank 0's slice: the other ranks hold only padding
        got = distributed_argmax(_slice(full, placement, rank), VocabShard(placement, rank, sizes[0] - 1))
        assert got.tolist() == full[:, : sizes[0] - 1].argmax(dim=-1).tolist()
        # a sliced (non-contiguous) view of [B, T, V] logits, as a program's last position
        logits = torch.randn(3, 2, total, generator=torch.Generator().manual_seed(7))
        last = _slice(logits, placement, rank)[:, -1, :]
        got = distributed_argmax(last, VocabShard(placement, rank, total))
        assert got.tolist() == logits[:, -1, :].argmax(dim=-1).tolist()
        comm.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[5, 3], [4, 2, 3], [37, 20]], ids=["tp2", "tp3", "tp2-wide"])
def test_greedy_choice_in_one_cpp_call_equals_argmax(sizes: list[int]) -> None:
    mp.spawn(_shared_memory_ranks, args=(len(sizes), free_port(), sizes), nprocs=len(sizes), join=True)


def test_warpers_match_transformers() -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    config = SamplingConfig(temperature=0.6, top_k=10, top_p=0.8)
    expected = scores
    for warper in (TemperatureLogitsWarper(0.6), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(torch.zeros(3, 1, dtype=torch.long), expected)
    torch.testing.assert_close(warp_logits(scores, config), expected, rtol=0, atol=0)


def test_sampling_config_validation(tmp_path: Path) -> None:
    from tpcompile.runtime.errors import InputError

    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy
    with pytest.raises(InputError, match="top-p must be in"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(InputError, match="top-k must be >= 1"):
        SamplingConfig(temperature=1.0, top_k=0)
