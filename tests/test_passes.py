"""The passes on many small programs and every tp, checked in-process: each rank's lowered graph is run and
every collective replaced by its definition (see tests/simulate.py). The real runtime is tested elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from examples import gpt
from tests.simulate import simulate
from tpcompile.compiler import plan_model
from tpcompile.frontend.capture import CapturedModel, captured_program
from tpcompile.plan.auto import choose_plan
from tpcompile.plan.spec import PlanFile
from tpcompile.runtime.format.hardware import HardwareProfile
from tpcompile.runtime.format.placement import Shard, balanced_split


def capture(module: nn.Module, *args: torch.Tensor, dynamic: object = None) -> CapturedModel:
    ep = torch.export.export(module.eval(), args, dynamic_shapes=dynamic)
    return captured_program(ep, type(module).__name__)


def check(
    captured: CapturedModel,
    tp: int,
    *inputs: torch.Tensor,
    atol: float = 1e-5,
    plan_file: PlanFile | None = None,
    profile: HardwareProfile | None = None,
) -> None:
    with torch.no_grad():
        expected = list(torch.utils._pytree.tree_leaves(captured.program.module()(*inputs)))
    for rank, outs in enumerate(simulate(captured, tp, list(inputs), plan_file, profile)):
        for got, ref in zip(outs, expected, strict=True):
            assert got.shape == ref.shape, (rank, got.shape, ref.shape)
            torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_balanced_split_gives_remainder_to_first_ranks() -> None:
    assert balanced_split(6, 4) == (2, 2, 1, 1)
    assert balanced_split(9, 2) == (5, 4)
    assert sum(balanced_split(257, 5)) == 257


@pytest.mark.parametrize(("heads", "tp"), [(6, 4), (6, 5), (3, 2), (4, 3), (2, 2)])
def test_gpt_uneven_splits(heads: int, tp: int) -> None:
    cfg = gpt.GPTConfig(vocab_size=101, n_head=heads, n_embd=heads * 8, n_layer=2)
    captured = capture(gpt.build_model(cfg), *gpt.example_inputs(cfg, seq=9), dynamic=gpt.dynamic_shapes(cfg))
    check(captured, tp, torch.randint(0, 101, (1, 13)))
    _, prop = plan_model(captured, tp)
    q = next(n for n, name in captured.state_names().items() if name == "blocks.0.attn.q.weight")
    pl = prop.roots[q]
    assert isinstance(pl, Shard) and pl.sizes == tuple(h * 8 for h in balanced_split(heads, tp))


class GQA(nn.Module):
    """Grouped-query attention through SDPA's enable_gqa, a KV cache buffer written with index_copy_."""

    def __init__(self, dim: int = 48, heads: int = 6, kv_heads: int = 2, max_len: int = 32) -> None:
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, max_len, self.d))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, max_len, self.d))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kvh, self.d).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        mask = self.attn_mask(pos)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))

    def attn_mask(self, pos: torch.Tensor) -> torch.Tensor | None:
        return None


@pytest.mark.parametrize("tp", [2])
def test_gqa_keeps_query_groups_with_their_kv_heads(tp: int) -> None:
    torch.manual_seed(0)
    model = GQA()
    x = torch.randn(1, 5, 48)
    captured = capture(model, x, torch.arange(5))
    check(captured, tp, x, torch.arange(5))
    _, prop = plan_model(captured, tp)
    roots = {captured.state_names()[n]: pl for n, pl in prop.roots.items()}
    assert roots["q.weight"] == Shard(0, (24, 24))  # 3 query heads of 8 per rank
    assert roots["k.weight"] == Shard(0, (8, 8))  # and the one KV head they share
    assert roots["k_cache"] == Shard(1, (1, 1))  # each rank caches only its KV head


@pytest.mark.parametrize("tp", [1, 3])
def test_gqa_more_ranks_than_kv_groups_is_still_correct(tp: int) -> None:
    torch.manual_seed(0)
    model = GQA()
    x = torch.randn(1, 5, 48)
    check(capture(model, x, torch.arange(5)), tp, x, torch.arange(5))


class GQAPerHeadMask(GQA):
    """GQA with an additive mask of one row per query head (causal, and a distance penalty whose slope differs
    by head), so that a split by query head splits the mask too."""

    def __init__(self, dim: int, heads: int, kv_heads: int, max_len: int = 32) -> None:
        super().__init__(dim, heads, kv_heads, max_len)
        self.max_len = max_len
        self.register_buffer("slopes", torch.linspace(0.1, 1.0, heads))

    def attn_mask(self, pos: torch.Tensor) -> torch.Tensor | None:
        keys = torch.arange(self.max_len)
        distance = (pos[:, None] - keys[None, :]).abs().float()  # [t, S]
        mask = -self.slopes[None, :, None, None] * distance[None, None]  # [1, H, t, S]
        return mask.masked_fill((keys[None, :] > pos[:, None])[None, None], float("-inf"))


SLOW_MEMORY = """
name = "slow-memory"
description = "weights stream at 10 MB/s, collectives free: the slowest rank's bytes decide"
predicted = true
[device]
memory_gib = 1
memory_bandwidth_gbs = 0.01
peak_tflops = 1
op_overhead_us = 0
max_ranks_per_node = 8
[link]
latency_us = 0
bandwidth_gbs = 100
"""


@pytest.mark.parametrize("masked", [False, True])
def test_gqa_balanced_heads_cut_a_kv_group(masked: bool) -> None:
    """9 query heads over 3 KV heads at tp=2: whole groups give 6+3; weighed on a profile where bytes decide,
    the balanced 5+4 split is kept (KV heads {0,1} and {1,2}, each rank attending once per KV head with the
    query heads it serves, the per-head mask sliced with them) and every rank's output is the reference's.
    Without a profile the balanced split is the plan too: its largest rank holds fewer bytes."""
    from tpcompile.runtime.format.hardware import parse_profile

    torch.manual_seed(0)
    model = GQAPerHeadMask(72, 9, 3) if masked else GQA(72, 9, 3)
    x = torch.randn(1, 5, 72)
    captured = capture(model, x, torch.arange(5))
    plain = plan_model(captured, 2)[1]
    roots = {captured.state_names()[n]: pl for n, pl in plain.roots.items()}
    assert (roots["q.weight"], roots["k.weight"]) == (Shard(0, (40, 32)), Shard(0, (16, 16), (0, 8)))
    whole_groups = choose_plan(captured.gm, 2, captured.state_names(), set(captured.user_inputs()))[1]
    roots = {captured.state_names()[n]: pl for n, pl in whole_groups.roots.items()}
    assert (roots["q.weight"], roots["k.weight"]) == (Shard(0, (48, 24)), Shard(0, (16, 8)))
    profile = parse_profile(SLOW_MEMORY, "slow-memory.toml")
    check(captured, 2, x, torch.arange(5), profile=profile)
    plan, prop = plan_model(captured, 2, profile=profile)
    assert [(w.balanced, w.chosen) for w in plan.weighed[:2]] == [(False, False), (True, True)]
    roots = {captured.state_names()[n]: pl for n, pl in prop.roots.items()}
    assert roots["q.weight"] == Shard(0, (40, 32))  # 5 + 4 query heads of 8
    assert roots["k.weight"] == Shard(0, (16, 16), (0, 8))  # KV heads 0-1 and 1-2
    assert roots["k_cache"] == Shard(1, (2, 2), (0, 1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 40)
        self.proj = nn.Linear(40, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.proj(F.silu(self.fc(self.norm(h))))
        scaled = self.fc(h).mean(-1, keepdim=True)  # a mean over a sharded dim: global count
        return F.linear(self.norm(h), self.emb.weight) + scaled


@pytest.mark.parametrize("tp", [2, 3])
def test_tied_embedding_and_global_mean(tp: int) -> None:
    captured = capture(Tied(), torch.randint(0, 50, (2, 7)))
    check(captured, tp, torch.randint(0, 50, (2, 7)))


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 30)
        self.b = nn.Linear(30, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.flip(torch.relu(self.a(x)), [-1]))


def test_op_without_rule_is_replicated_with_a_warning() -> None:
    """Forcing ``a`` column-parallel puts a shard into flip, which has no rule: gathered, warned, correct."""
    captured = capture(Unknown(), torch.randn(3, 12))
    forced = PlanFile((("a.weight", "colwise"),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, prop = plan_model(captured, 2, forced)
    check(captured, 2, torch.randn(3, 12), plan_file=forced)
    [warning] = prop.warnings
    assert warning.startswith("no sharding rule for aten.flip.default: inputs replicated at File ")
    assert "test_passes.py" in warning
    gathered_for = [c.target for red, consumers in prop.collectives() for c in consumers]
    assert torch.ops.aten.flip.default in gathered_for


def test_plan_file_overrides() -> None:
    cfg = gpt.GPTConfig(n_layer=1)
    captured = capture(gpt.build_model(cfg), *gpt.example_inputs(cfg), dynamic=gpt.dynamic_shapes(cfg))
    plan_file = PlanFile((("*", "replicate"),))
    _, prop = plan_model(captured, 2, plan_file)
    assert not prop.collectives()
    check(captured, 2, torch.randint(0, 256, (1, 6)), plan_file=plan_file)
    rowwise = PlanFile((("*.mlp.fc.weight", "rowwise"),))
    check(captured, 2, torch.randint(0, 256, (1, 6)), plan_file=rowwise)


class Einsum(nn.Module):
    """A column-parallel linear into heads, head-batched einsum contractions, and a row-parallel einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Linear(16, 32)  # -> 4 heads of 8
        self.w_out = nn.Parameter(torch.randn(4, 8, 16) * 0.2)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.w_in(self.norm(x)).view(b, t, 4, 8)
        scores = torch.einsum("bthk,bshk->bhts", h, h).softmax(-1)
        h = torch.einsum("bhts,bshk->bthk", scores, h)
        return x + torch.einsum("bthk,hkd->btd", torch.relu(h), self.w_out)


@pytest.mark.parametrize("tp", [2, 3])
def test_einsum(tp: int) -> None:
    torch.manual_seed(0)
    captured = capture(Einsum(), torch.randn(2, 5, 16))
    check(captured, tp, torch.randn(2, 5, 16))
    _, prop = plan_model(captured, tp)
    assert not prop.warnings
    roots = {captured.state_names()[n]: pl for n, pl in prop.roots.items()}
    heads = balanced_split(4, tp)
    assert roots["w_in.weight"] == Shard(0, tuple(8 * h for h in heads))
    assert roots["w_out"] == Shard(0, heads)
    assert [red.collective for red, _ in prop.collectives()] == ["all_reduce"]
