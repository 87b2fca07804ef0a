"""Decode-speed rewrites of a loaded program: they change how it runs, never what it computes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.checkpoints import save_smollm2_tokenizer, tiny_checkpoint
from tests.conftest import tpcompile, tprun
from tpcompile.runtime.weight_layout import prefer_column_major_wide_weights


class _TiedHead(nn.Module):
    """Embedding and a tied vocabulary head (wide: 64 x 8), one square and one narrow linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.square = nn.Linear(8, 8)
        self.narrow = nn.Linear(8, 2, bias=False)
        self.up = nn.Linear(8, 16)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.square(self.embed(ids)) + self.up(self.embed(ids))[..., :8]
        return F.linear(h, self.embed.weight), self.narrow(h)


def test_wide_linear_weights_become_column_major_with_identical_values() -> None:
    ids = torch.tensor([[3, 1, 63, 0]])
    module = torch.export.export(_TiedHead(), (ids,)).module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        want = module(ids)

    changed = prefer_column_major_wide_weights(module)

    assert changed == ["embed.weight", "up.weight"]
    params = dict(module.named_parameters())
    for name, param in params.items():
        assert torch.equal(param, before[name]), name
        assert param.is_contiguous() == (name not in changed), name
    assert params["embed.weight"].t().is_contiguous()
    with torch.no_grad():
        got = module(ids)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_tprun_compile_gives_the_eager_tokens(tmp_path: Path) -> None:
    """``tprun --compile`` (Inductor decode step, collectives as custom ops over shared memory) on a tiny
    Qwen2 at tp=2 (q/k/v biases, uneven vocabulary shards): the greedy tokens of transformers."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoint("qwen2", tmp_path / "ckpt", save_smollm2_tokenizer(tmp_path / "tok"))
    out = tmp_path / "out"
    compiled = tpcompile(ckpt, "--tp", 2, "-o", out, "--max-seq-len", 64, "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    saved = tmp_path / "ids.json"
    ran = tprun(out, "--prompt", "Why?", "--max-new-tokens", 24, "--compile", "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    [result] = json.loads(saved.read_text())
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(
            torch.tensor([result["prompt_ids"]]), max_new_tokens=24, do_sample=False, top_k=None, top_p=None
        )
    assert result["new_ids"] == [int(t) for t in ids[0, len(result["prompt_ids"]) :]]
