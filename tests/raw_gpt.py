"""A GPT written in plain PyTorch with raw ``nn.Parameter`` weights in every layout a person writes: the
token table read by indexing (``E[idx]``), q by an einsum projection, k as ``x @ Wk.T`` (``[out, in]``),
v, o and the MLP as ``x @ W`` (``[in, out]``), and the output tied to the table (``x @ E.T``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RawGPT(nn.Module):
    def __init__(self, vocab: int = 97, dim: int = 48, heads: int = 6, layers: int = 2, hidden: int = 96):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.2)

        self.heads, self.head_dim = heads, dim // heads
        self.embed = param(vocab, dim)
        self.wq = nn.ParameterList([param(dim, heads, dim // heads) for _ in range(layers)])
        self.wk = nn.ParameterList([param(dim, dim) for _ in range(layers)])
        self.wv = nn.ParameterList([param(dim, dim) for _ in range(layers)])
        self.wo = nn.ParameterList([param(dim, dim) for _ in range(layers)])
        self.w_up = nn.ParameterList([param(dim, hidden) for _ in range(layers)])
        self.w_down = nn.ParameterList([param(hidden, dim) for _ in range(layers)])
        self.norm = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(layers + 1)])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.embed[idx]
        for layer in range(len(self.wk)):
            h = F.rms_norm(x, (x.shape[-1],), self.norm[layer])
            q = torch.einsum("btd,dhk->bthk", h, self.wq[layer]).transpose(1, 2)
            k = (h @ self.wk[layer].T).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            v = (h @ self.wv[layer]).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(b, t, -1) @ self.wo[layer]
            x = (
                x
                + F.gelu(F.rms_norm(x, (x.shape[-1],), self.norm[-1]) @ self.w_up[layer]) @ self.w_down[layer]
            )
        return x @ self.embed.T


def build(decomposed: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...], object]:
    """The model, example inputs and a dynamic sequence length (the ``tpcompile`` factory form)."""
    model = RawGPT().eval()
    idx = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    return model, (idx,), ({1: torch.export.Dim("seq", min=2, max=64)},)


def export(decomposed: bool = False) -> torch.export.ExportedProgram:
    model, args, dynamic = build()
    program = torch.export.export(model, args, dynamic_shapes=dynamic)
    return program.run_decompositions() if decomposed else program
