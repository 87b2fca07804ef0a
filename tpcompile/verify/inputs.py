"""The inputs ``tpcompile verify`` feeds an artifact and its reference when the user gives none.

- A causal LM (manifest ``kind == "causal_lm"``) gets a prefill: random token ids below the vocabulary
  size, ``PREFILL_TOKENS`` of them (fewer when the KV cache is shorter), written at positions ``0 .. L-1``
  of a fresh cache, in every row of its batch. The input contract (shared positions or independent rows)
  is read from the manifest's LM section, never from the model's name.
- Any other program gets random inputs from its example shapes: floats ``randn``, booleans, and integers
  below the smallest embedding table they index (else in ``[0, 2)``).

Invariant: the same seed gives the same inputs; every LM input is inside the program's dynamic ranges
(``1 <= L <= max_seq_len - 1``), so no position the attention reads is left unwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from tpcompile.artifact.program import input_signature
from tpcompile.errors import UsageError
from tpcompile.frontend import CapturedModel
from tpcompile.runtime.format import ROW_INPUT_NAMES, SHARED_INPUT_NAMES, LMInfo, Manifest

__all__ = ["PREFILL_TOKENS", "VerifyInputs", "lm_prefill", "random_inputs"]

#: Tokens of the prefill verify feeds a causal LM (capped by the KV cache length).
PREFILL_TOKENS = 16


@dataclass(frozen=True)
class VerifyInputs:
    """Inputs in the artifact's input order, and what they are (for the report)."""

    tensors: list[torch.Tensor]
    description: str


def _id_bound(node: fx.Node) -> int | None:
    """The smallest embedding table an integer input indexes, if any: random ids must stay below it."""
    bounds = []
    for user in node.users:
        weight = user.args[0]
        if "embedding" in str(user.target) and user.args[1] is node and isinstance(weight, fx.Node):
            bounds.append(int(weight.meta["val"].shape[0]))
    return min(bounds) if bounds else None


def random_inputs(captured: CapturedModel, seed: int) -> VerifyInputs:
    """Random inputs of the example shapes of ``captured`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    nodes = captured.user_inputs()
    examples, _ = input_signature(captured.program, nodes)
    out = []
    for node, ex in zip(nodes, examples, strict=True):
        if ex.dtype.is_floating_point:
            out.append(torch.randn(ex.shape, generator=gen, dtype=ex.dtype))
        elif ex.dtype == torch.bool:
            out.append(torch.randint(0, 2, ex.shape, generator=gen).bool())
        else:
            high = _id_bound(node) or 2
            out.append(torch.randint(0, high, ex.shape, generator=gen, dtype=ex.dtype))
    return VerifyInputs(out, f"random inputs (seed {seed})")


def lm_prefill(manifest: Manifest, lm: LMInfo, seed: int) -> VerifyInputs:
    """A prefill of random ids at positions ``0 .. L-1`` in every row, in the input contract of ``manifest``.

    Raises:
        UsageError: the artifact's inputs are not a causal-LM contract this verify knows.
    """
    expected = ROW_INPUT_NAMES if lm.independent_rows else SHARED_INPUT_NAMES
    names = manifest.input_names
    if sorted(names) != sorted(expected):
        raise UsageError(
            f"causal_lm artifact takes inputs {names}, expected {', '.join(expected)}: pass --inputs"
        )
    length = min(PREFILL_TOKENS, lm.max_seq_len - 1)
    rows = lm.max_batch_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.vocab_size, (rows, length), generator=gen, dtype=torch.int64)
    positions = torch.arange(length, dtype=torch.int64)
    if lm.independent_rows:  # every row in its own slot 0 .. rows-1, each at positions 0 .. L-1
        given = {
            "input_ids": ids,
            "position_ids": positions.expand(rows, -1).contiguous(),
            "first_slot": torch.zeros(1, dtype=torch.int64),
        }
    else:
        given = {"input_ids": ids, "cache_position": positions}
    described = f"a prefill of {length} random token ids at positions 0..{length - 1}"
    if rows > 1:
        described += f" in each of {rows} rows"
    return VerifyInputs([given[n] for n in names], f"{described} (seed {seed}), fresh KV cache")
