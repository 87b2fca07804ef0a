"""The slots of a causal-LM artifact with independent rows: one sequence per KV-cache slot, decoded together.

A :class:`BatchEngine` drives a :class:`RowModel` (a :class:`~tpcompile.runtime.lm.generate.CausalLM` of an
artifact compiled with ``--max-batch-size`` B > 1): :meth:`BatchEngine.prefill` writes a new sequence's
prompt into a free slot (one program call, ``B = 1`` at that slot) and chooses its first token;
:meth:`BatchEngine.decode` runs one program call over the contiguous window of busy slots (``T = 1``) and
chooses one token for each busy slot; :meth:`BatchEngine.release` frees a slot for the next sequence.

Invariants:
- a slot holds at most ``max_seq_len`` positions; a busy slot's next write is at its own position, so slots
  never see each other's entries, and a reused slot needs no clearing (the program masks every key past a
  query's position: see ``frontend/hf_rows.py``);
- a free slot inside the decode window is fed token 0 at position 0: it writes its own (unused) position 0
  and its token is discarded;
- every rank runs the same calls in the same order with the same arguments and gets the same tokens
  (:func:`~tpcompile.runtime.lm.sampling.choose_tokens`), so the engines of all ranks stay identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import PromptError
from ..format import LMInfo
from .options import SamplingConfig
from .sampling import VocabShard

__all__ = ["BatchEngine", "RowModel", "SlotState", "check_prompt_length"]


def check_prompt_length(lm: LMInfo, n_tokens: int) -> None:
    """Raise :class:`PromptError` unless a prompt of ``n_tokens`` leaves room for one new token."""
    if n_tokens < 1:
        raise PromptError("the prompt is empty (0 tokens)")
    if n_tokens >= lm.max_seq_len:
        raise PromptError(
            f"prompt has {n_tokens} tokens but the artifact's KV cache holds {lm.max_seq_len} "
            "(compile with a larger --max-seq-len)"
        )


class RowModel(Protocol):
    """What the engine needs from a loaded rank (``CausalLM``)."""

    lm: LMInfo
    shard: VocabShard

    @property
    def device(self) -> torch.device: ...

    def forward_rows(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Last-position local logits ``[B, V_local]`` of slots ``first_slot .. first_slot + B``."""
        ...

    def choose(
        self,
        logits: torch.Tensor,
        configs: Sequence[SamplingConfig],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """One token per row of ``logits``, the same on every rank."""
        ...


@dataclass
class SlotState:
    """A busy slot: the token to feed next, the position it goes to, and how tokens are chosen."""

    token: int
    position: int
    sampling: SamplingConfig
    generator: torch.Generator | None = field(default=None, repr=False)


class BatchEngine:
    """Prefill, decode and release the slots of one rank's model (see the module invariants)."""

    def __init__(self, model: RowModel) -> None:
        if not model.lm.independent_rows:
            raise PromptError(
                "this artifact answers one sequence at a time: compile it with --max-batch-size > 1 "
                "to batch independent requests"
            )
        self.model = model
        self.slots = model.lm.max_batch_size
        self.busy: dict[int, SlotState] = {}

    def free_slot(self) -> int | None:
        """The lowest free slot (busy slots stay packed at the start of the cache), or None."""
        return next((s for s in range(self.slots) if s not in self.busy), None)

    def prefill(self, slot: int, prompt_ids: Sequence[int], sampling: SamplingConfig) -> int:
        """Write ``prompt_ids`` into free ``slot`` and return the first new token (the slot is then busy)."""
        if slot in self.busy or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not a free slot of {self.slots}")
        check_prompt_length(self.model.lm, len(prompt_ids))
        device = self.model.device
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
        positions = torch.arange(len(prompt_ids), dtype=torch.int64, device=device)[None]
        logits = self.model.forward_rows(ids, positions, slot)
        token = self.model.choose(logits, [sampling], [generator])[0]
        self.busy[slot] = SlotState(token, len(prompt_ids), sampling, generator)
        return token

    def decode(self) -> dict[int, int]:
        """One step for every busy slot: feed each its last token, return ``{slot: next token}``."""
        if not self.busy:
            return {}
        lo, hi = min(self.busy), max(self.busy) + 1
        states = [self.busy.get(s) for s in range(lo, hi)]
        device = self.model.device
        logits = self.model.forward_rows(
            torch.tensor([[st.token if st else 0] for st in states], dtype=torch.int64, device=device),
            torch.tensor([[st.position if st else 0] for st in states], dtype=torch.int64, device=device),
            lo,
        )
        live = [(lo + i, st) for i, st in enumerate(states) if st is not None]
        if len(live) < len(states):
            logits = logits[[slot - lo for slot, _ in live]]
        chosen = self.model.choose(logits, [st.sampling for _, st in live], [st.generator for _, st in live])
        out: dict[int, int] = {}
        for (slot, state), token in zip(live, chosen, strict=True):
            state.token, state.position = token, state.position + 1
            out[slot] = token
        return out

    def release(self, slot: int) -> None:
        """Free ``slot`` (no-op when it is free already)."""
        self.busy.pop(slot, None)
