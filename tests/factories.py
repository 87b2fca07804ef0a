"""Factories for CLI tests (``tests.factories:NAME``)."""

from __future__ import annotations

from typing import Any

from examples import gpt


def gpt_other_weights() -> tuple[Any, ...]:
    """The example GPT's architecture with different weights: a wrong reference for ``verify``."""
    model, args, dynamic = gpt.build()
    return gpt.build_model(seed=1), args, dynamic


def softmax_head() -> tuple[Any, ...]:
    """A weight the plan keeps whole (see tests/test_weight_layouts.py)."""
    import torch

    from tests.test_weight_layouts import SoftmaxHead

    torch.manual_seed(0)
    return SoftmaxHead().eval(), (torch.randn(2, 5, 16),)


def two_heads_wide_mlp() -> tuple[Any, ...]:
    """One transformer block, 2 attention heads and a 64-wide MLP: at tp=64 the MLP still splits (one
    column per rank) while the heads fit 2 ranks at most (tests/test_cli_errors.py)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
            self.fc, self.proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
            return x + self.proj(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    return Block().eval(), (torch.randn(1, 4, 16),)
