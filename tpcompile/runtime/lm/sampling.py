"""Choosing the next token from vocabulary-sharded logits.

Invariant: every rank of the group returns the same token id.  Greedy
decoding equals ``torch.argmax`` over the full (unsharded) vocabulary,
including its tie rule (the lowest index wins) and NaN rule (a NaN counts as
the maximum), while exchanging only two numbers per row.  Sampling gathers
the full logits, warps them like transformers' temperature / top-k / top-p
warpers (in that order), and lets rank 0 draw the token, which it broadcasts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..format import Placement, Shard
from ..kernels.cpu_ops import shared_memory_argmax
from ..transport.collectives import all_gather_small, broadcast_tokens, gather_sharded, world_size
from .options import SamplingConfig

__all__ = [
    "SamplingConfig",
    "VocabShard",
    "choose_token",
    "choose_tokens",
    "distributed_argmax",
    "warp_logits",
]


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: global ids ``[offset, offset + valid)``.

    ``placement`` describes how the logits are split over ranks (a :class:`Shard`
    of the last dim, or replicated); entries past ``vocab_size`` (padding) are
    never chosen.
    """

    placement: Placement
    rank: int
    vocab_size: int

    @property
    def offset(self) -> int:
        """Global id of this rank's first logit."""
        return self.placement.offset(self.rank) if isinstance(self.placement, Shard) else 0

    @property
    def last_dim(self) -> Placement:
        """The split of the ``[B, V_local]`` logits a token is chosen from: the manifest's placement
        describes the program's ``[B, T, V]`` output, whose vocabulary dim is also the last."""
        if isinstance(self.placement, Shard):
            return Shard(-1, self.placement.sizes, self.placement.starts)
        return self.placement

    @property
    def valid(self) -> int:
        """How many of this rank's logits are real vocabulary entries."""
        local = self.placement.sizes[self.rank] if isinstance(self.placement, Shard) else self.vocab_size
        return max(0, min(local, self.vocab_size - self.offset))


def distributed_argmax(
    local: torch.Tensor, shard: VocabShard, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Global argmax ids ``[B]`` of logits whose last dim is sharded; ``local`` is ``[B, V_local]``.

    Each rank contributes ``(max, argmax + offset)`` per row (packed into
    float64, exact for any float logits and ids < 2**53); the winner is the
    first rank holding the maximum, i.e. the lowest global index on ties.  When the C++ collectives are
    attached to the default group's shared-memory segment (ranks of one host running native programs),
    all of it is one C++ call (``kernels/cpu_ops.shared_memory_argmax``), with the same result.
    """
    world = world_size(group)
    if not isinstance(shard.placement, Shard) or world == 1:
        return local[:, : shard.vocab_size].argmax(dim=-1)
    if group in (None, dist.group.WORLD):
        native = shared_memory_argmax(local, shard.valid, shard.offset, world)
        if native is not None:
            return native
    rows = local.shape[0]
    mine = local[:, : shard.valid]
    if mine.shape[-1] == 0:
        values = torch.full((rows,), float("-inf"), dtype=torch.float64, device=local.device)
        ids = torch.full((rows,), shard.offset, dtype=torch.int64, device=local.device)
    else:
        ids = mine.argmax(dim=-1)
        values = mine.gather(-1, ids[:, None]).squeeze(-1).double()
        ids = ids + shard.offset
    pair = torch.stack([values, ids.double()], dim=-1).contiguous()
    table = torch.stack(all_gather_small(pair, group))  # [tp, B, 2]
    winner = table[..., 0].argmax(dim=0)  # first maximal rank per row
    return table[winner, torch.arange(rows, device=local.device), 1].long()


def warp_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p on float ``[B, V]`` logits (transformers' warpers)."""
    scores = logits / config.temperature if config.temperature not in (0.0, 1.0) else logits
    if config.top_k is not None:
        k = min(config.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - config.top_p)
        drop_sorted[..., -1:] = False  # keep at least one token
        drop = drop_sorted.scatter(1, sorted_ids, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def choose_token(
    local: torch.Tensor,
    shard: VocabShard,
    config: SamplingConfig,
    generator: torch.Generator | None,
    group: dist.ProcessGroup | None = None,
) -> int:
    """The next token for row 0 of ``local`` (``[B, V_local]`` last-position logits), same on all ranks.

    ``generator`` is only used for sampling, and only on rank 0 of ``group``.
    """
    return choose_tokens(local[:1], shard, [config], [generator], group)[0]


def choose_tokens(
    local: torch.Tensor,
    shard: VocabShard,
    configs: Sequence[SamplingConfig],
    generators: Sequence[torch.Generator | None],
    group: dist.ProcessGroup | None = None,
) -> list[int]:
    """The next token of every row of ``local`` (``[B, V_local]``), row ``b`` chosen by ``configs[b]``
    (with ``generators[b]`` on rank 0 when it samples); the same list on all ranks.

    Greedy rows take one distributed argmax together; sampled rows gather their full logits, rank 0
    draws each row's token and broadcasts them.  Every rank must pass the same configs (which rows
    sample decides which collectives run).
    """
    rows = local.shape[0]
    greedy = [b for b in range(rows) if configs[b].greedy]
    sampled = [b for b in range(rows) if not configs[b].greedy]
    tokens = [0] * rows
    if greedy:
        picked = distributed_argmax(local if not sampled else local[greedy], shard, group).tolist()
        for b, token in zip(greedy, picked, strict=True):
            tokens[b] = int(token)
    if not sampled:
        return tokens
    full = gather_sharded(local[sampled], shard.last_dim, group)[:, : shard.vocab_size].float()
    drawn = torch.zeros(len(sampled), dtype=torch.int64, device=local.device)
    if not dist.is_initialized() or dist.get_rank(group) == 0:
        for i, b in enumerate(sampled):
            probs = warp_logits(full[i : i + 1], configs[b]).softmax(dim=-1)
            drawn[i] = torch.multinomial(probs, num_samples=1, generator=generators[b])[0, 0]
    for b, token in zip(sampled, broadcast_tokens(drawn, 0, group), strict=True):
        tokens[b] = token
    return tokens
