"""Decode-speed rewrites of a loaded program: they change how it runs, never what it computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.checkpoints import save_smollm2_tokenizer, tiny_checkpoint
from tests.conftest import tpcompile, tprun
from tpcompile.runtime.kernels.weight_layout import prefer_column_major_wide_weights


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


# --- streaming matrix-vector kernel -------------------------------------------------------------


def _kernel() -> None:
    from tpcompile.runtime.kernels.streaming_linear import kernel_available

    # this machine (and CI) has a C compiler: the kernel must build, or every other check here is moot
    assert kernel_available()


def test_streaming_linear_matches_linear_for_decode_shapes(one_thread: None) -> None:
    from tpcompile.runtime.kernels.streaming_linear import MAX_ROWS, decode_linear

    _kernel()
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in [(576, 576), (192, 576), (37, 1536), (130, 7), (5, 80), (24, 16)]:
        weight = torch.randn(out_f, in_f, generator=gen)
        bias = torch.randn(out_f, generator=gen)
        for rows in (1, 3, MAX_ROWS):
            x = torch.randn(rows, 1, in_f, generator=gen)
            for b in (None, bias):
                got = decode_linear(x, weight, b)
                assert got.shape == (rows, 1, out_f)
                torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5 * in_f**0.5)


def test_streaming_linear_leaves_other_cases_to_torch_exactly(one_thread: None) -> None:
    from tpcompile.runtime.kernels.streaming_linear import MAX_ROWS, decode_linear

    _kernel()
    weight = torch.randn(48, 64)
    cases = [
        (torch.randn(MAX_ROWS + 1, 64), weight),  # a prompt: BLAS matrix-matrix product
        (torch.randn(1, 64), torch.randn(64, 48).t()),  # weight not row-major
        (torch.randn(1, 64, dtype=torch.float64), weight.double()),  # not float32
        (torch.randn(1, 64, dtype=torch.bfloat16), weight.bfloat16()),
    ]
    for x, w in cases:
        assert torch.equal(decode_linear(x, w), F.linear(x, w))
    # the kernel does differ from BLAS in the last bits; with two threads BLAS does the product
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(decode_linear(x, weight), F.linear(x, weight))
    torch.set_num_threads(2)
    assert torch.equal(decode_linear(x, weight), F.linear(x, weight))
    one = torch.ones(1)  # a bias F.linear broadcasts
    assert torch.equal(
        decode_linear(torch.ones(1, 64), weight, one), F.linear(torch.ones(1, 64), weight, one)
    )
    # mismatched features are F.linear's error, never a read past the activation
    for x in (torch.randn(1, 128), torch.randn(1, 32)):
        with pytest.raises(RuntimeError):
            decode_linear(x, weight)


def test_streaming_linear_rewrite_keeps_the_programs_outputs(one_thread: None) -> None:
    from tpcompile.runtime.kernels.streaming_linear import decode_linear, use_streaming_linear

    _kernel()
    ids = torch.tensor([[3, 1, 63, 0]])
    module = torch.export.export(_TiedHead(), (ids[:, :1],)).module()
    with torch.no_grad():
        want = [module(ids[:, i : i + 1]) for i in range(4)]
    torch.set_num_threads(2)
    assert use_streaming_linear(module) == 0  # BLAS with the threads (and the weight layout it reads best)
    torch.set_num_threads(1)
    assert use_streaming_linear(module) == 4
    targets = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.linear.default not in targets and targets.count(decode_linear) == 4
    with torch.no_grad():
        for i in range(4):
            for g, w in zip(module(ids[:, i : i + 1]), want[i], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_no_compiler_means_torch_linear(tmp_path: Path) -> None:
    """Without a working C compiler the kernel is unavailable and nothing is rewritten."""
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F\n"
        "from tpcompile.runtime.kernels import streaming_linear as s\n"
        "assert not s.kernel_available()\n"
        "m = torch.export.export(torch.nn.Linear(4, 3), (torch.ones(1, 4),)).module()\n"
        "assert s.use_streaming_linear(m) == 0\n"
        "x, w = torch.ones(1, 4), torch.ones(3, 4)\n"
        "assert torch.equal(s.decode_linear(x, w), F.linear(x, w))\n"
    )
    for env in ({"CC": "false", "TPCOMPILE_CACHE": str(tmp_path)}, {"TPCOMPILE_CPU_KERNELS": "0"}):
        done = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    assert not list(tmp_path.rglob("*.so"))


# --- attention over the written part of the cache -------------------------------------------------


def _sdpa_inputs(keys: int, filled: int, heads: int = 4, kv_heads: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, heads, 2, 16, generator=gen)
    k = torch.randn(1, kv_heads, keys, 16, generator=gen)
    v = torch.randn(1, kv_heads, keys, 16, generator=gen)
    k[..., filled:, :], v[..., filled:, :] = 1e4, float("nan")  # stale cache slots must not matter
    positions = torch.arange(keys)
    mask = (positions[None, :] <= torch.tensor([filled - 2, filled - 1])[:, None])[None, None]
    return q, k, v, mask


def test_prefix_attention_equals_full_attention_for_every_mask_kind() -> None:
    from tpcompile.runtime.kernels.prefix_attention import attended_prefix, prefix_attention

    q, k, v, mask = _sdpa_inputs(keys=64, filled=11)
    assert attended_prefix(mask) == 11
    k_clean, v_clean = k.clone(), v.clone()
    k_clean[..., 11:, :], v_clean[..., 11:, :] = 0.0, 0.0
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    minimum = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in (mask, additive, minimum):
        want = F.scaled_dot_product_attention(q, k_clean, v_clean, m, scale=0.3, enable_gqa=True)
        got = prefix_attention(q, k, v, m.clone(), scale=0.3, enable_gqa=True)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a column open for one query only is kept; so is everything when nothing is cut
    holed = mask.clone()
    holed[..., 0, 40] = True
    assert attended_prefix(holed) == 41
    k[..., 11:, :], v[..., 11:, :] = k_clean[..., 11:, :], v_clean[..., 11:, :]
    torch.testing.assert_close(
        prefix_attention(q, k, v, holed, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, holed, enable_gqa=True),
    )


class _CachedAttention(nn.Module):
    """Attention over a 32-slot cache with the mask built in the graph, as exported causal LMs do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k", torch.randn(1, 2, 32, 8))
        self.register_buffer("v", torch.randn(1, 2, 32, 8))

    def forward(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(32)[None, :] <= pos[:, None])[None, None]
        a = F.scaled_dot_product_attention(q, self.k, self.v, mask)
        return F.scaled_dot_product_attention(a, self.k, self.v, mask) + a


class _MaskInput(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, k, mask)


def test_prefix_attention_rewrite_only_where_the_mask_is_made_in_the_graph() -> None:
    from tpcompile.runtime.kernels.prefix_attention import prefix_attention, use_prefix_attention

    q, pos = torch.randn(1, 2, 1, 8), torch.tensor([5])
    module = torch.export.export(_CachedAttention(), (q, pos)).module()
    want = [module(q, torch.tensor([p])) for p in (0, 5, 31)]
    assert use_prefix_attention(module) == 2
    assert sum(n.target is prefix_attention for n in module.graph.nodes) == 2
    for p, w in zip((0, 5, 31), want, strict=True):
        torch.testing.assert_close(module(q, torch.tensor([p])), w, rtol=1e-6, atol=1e-6)
    # a mask given as an input may be reused and changed between calls: that graph is left alone
    k, mask = torch.randn(1, 2, 32, 8), torch.ones(1, 1, 1, 32, dtype=torch.bool)
    given = torch.export.export(_MaskInput(), (q, k, mask)).module()
    assert use_prefix_attention(given) == 0


def test_a_mask_shared_by_compiled_attention_calls_is_computed_once() -> None:
    """In a graph to be compiled, the attention calls that share a mask read one ``computed_once`` copy of
    it (Inductor would otherwise rebuild the mask inside each call's kernel), with the same results."""
    from tpcompile.runtime.kernels.prefix_attention import use_prefix_attention

    q = torch.randn(1, 2, 1, 8)
    module = torch.export.export(_CachedAttention(), (q, torch.tensor([5]))).module()
    want = [module(q, torch.tensor([p])) for p in (0, 5, 31)]
    assert use_prefix_attention(module, custom_op=True) == 2
    calls = module.graph.find_nodes(op="call_function", target=torch.ops.tpcompile.prefix_attention.default)
    copies = module.graph.find_nodes(op="call_function", target=torch.ops.tpcompile.computed_once.default)
    assert len(calls) == 2 and len(copies) == 1
    assert all(call.args[3] is copies[0] for call in calls)
    for p, w in zip((0, 5, 31), want, strict=True):
        torch.testing.assert_close(module(q, torch.tensor([p])), w, rtol=1e-6, atol=1e-6)
