"""A small GPT-style transformer in plain PyTorch, used as tpcompile's reference example.

The model is deliberately written the "textbook" way (separate q/k/v projections, explicit
view/transpose for heads, an explicit causal mask built from the dynamic sequence length) so that
the compiler sees ordinary ATen ops after ``torch.export``.

Factory for the CLI::

    tpcompile examples.gpt:build --tp 2 -o out/gpt-tp2
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64  # maximum sequence length (size of the learned position table)
    n_layer: int = 2
    n_head: int = 6  # need not divide the TP degree
    n_embd: int = 96

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        c = config.n_embd
        self.q = nn.Linear(c, c, bias=True)
        self.k = nn.Linear(c, c, bias=True)
        self.v = nn.Linear(c, c, bias=True)
        self.o = nn.Linear(c, c, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q = self.q(x).view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = self.k(x).view(B, T, H, D).transpose(1, 2)
        v = self.v(x).view(B, T, H, D).transpose(1, 2)

        att = q @ k.transpose(-2, -1) * self.scale  # [B, H, T, T]
        mask = torch.ones(T, T, device=x.device).tril()  # built from the dynamic T, no buffer
        att = att.masked_fill(mask == 0, float("-inf"))
        att = att.softmax(dim=-1)
        y = att @ v  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned positions
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # not tied to wte

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: int64 [B, T] token ids -> logits [B, T, vocab_size]."""
        _, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)


def _default_config(config: GPTConfig | None) -> GPTConfig:
    return GPTConfig() if config is None else config


def build_model(config: GPTConfig | None = None, seed: int = 0) -> GPT:
    """Deterministically initialised GPT in eval mode. Does not disturb the global RNG.

    Linear/embedding weights keep PyTorch's default (seeded) init, which gives O(1) activations and
    logits; LayerNorm affine params are perturbed away from (1, 0) so that a compiler mishandling
    them is caught by numerical comparison.
    """
    config = _default_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(0.1 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model.eval()


def example_inputs(config: GPTConfig | None = None, batch: int = 1, seq: int = 8) -> tuple[torch.Tensor]:
    """Example positional args for ``GPT.forward``: ``(idx,)`` with idx int64 of shape [batch, seq]."""
    config = _default_config(config)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randint(0, config.vocab_size, (batch, seq), dtype=torch.int64, generator=g)
    return (idx,)


def dynamic_shapes(config: GPTConfig | None = None) -> dict[str, Any]:
    """``torch.export`` dynamic-shape spec: the sequence dim of ``idx`` is dynamic in [2, block_size].

    (min is 2, not 1: export specialises size-1 dims.) The batch dim stays static.
    """
    config = _default_config(config)
    seq = torch.export.Dim("seq", min=2, max=config.block_size)
    return {"idx": {1: seq}}


def build() -> tuple[GPT, tuple[torch.Tensor], dict[str, Any]]:
    """Factory used by the CLI (``examples.gpt:build``): ``(model, example_args, dynamic_shapes)``."""
    config = GPTConfig()
    return build_model(config), example_inputs(config), dynamic_shapes(config)


def export(config: GPTConfig | None = None, path: str | Path | None = None) -> torch.export.ExportedProgram:
    """Export the example model with a dynamic sequence dim; save it to ``path`` if given."""
    config = _default_config(config)
    model = build_model(config)
    ep = torch.export.export(model, example_inputs(config), dynamic_shapes=dynamic_shapes(config))
    if path is not None:
        torch.export.save(ep, str(path))
    return ep
