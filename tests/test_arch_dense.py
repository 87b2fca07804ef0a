"""Dense families the planner was not written for, sharded from the graph alone: OPT (biases on every
projection), Gemma (scaled embeddings, tied weights, head_dim != hidden / heads, 6 query heads over 2 KV
heads), Phi-3 (fused qkv_proj sliced into q, k, v; fused gate_up_proj chunked), GPT-2 (Conv1D ``addmm``
layers, one fused c_attn split into q, k, v; learned positions; tied lm_head) and GPT-NeoX (fused qkv
interleaved per head, partial rotary, parallel attention + MLP residual).

Tiny random-weight Hugging Face checkpoints, captured by the real frontend. Every rank's program is run
in-process (tests/simulate.py: collectives replaced by their definitions) at tp = 1..4 and compared with
transformers in fp32: logits of a prefill and two decode steps within 1e-5, greedy tokens identical, two
all-reduces per layer (one for GPT-NeoX's parallel residual) plus one for the vocabulary-parallel
embedding, no all-gather, and no 2-d weight left replicated. One family (GPT-2 at tp=3) also goes through
``tpcompile`` and ``tprun`` on real gloo processes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import random_checkpoint, save_smollm2_tokenizer
from tests.conftest import tpcompile, tprun
from tests.simulate import Simulator
from tpcompile.artifact.describe import collective_entries
from tpcompile.frontend.capture import CapturedModel
from tpcompile.frontend.hf import load_hf
from tpcompile.runtime.format.placement import Pieces, Replicate, Shard

VOCAB = 49155  # SmolLM2's tokenizer fits; uneven vocabulary shards at tp = 2 and 4
LAYERS = 2
MAX_SEQ = 32

FAMILIES: dict[str, dict[str, Any]] = {
    "opt": dict(
        model_type="opt", hidden_size=96, ffn_dim=160, num_attention_heads=12, word_embed_proj_dim=96
    ),
    "gemma": dict(
        model_type="gemma",
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,
    ),
    "phi3": dict(
        model_type="phi3",
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        pad_token_id=0,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=96, n_head=12, n_inner=160, n_positions=256),
    # multi-query attention: one KV head serves every query head, so every rank holds it (and its cache)
    "gemma_mqa": dict(
        model_type="gemma",
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "llama_mqa": dict(
        model_type="llama",
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=6,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=12,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
}
ALL_REDUCES_PER_LAYER = {"gpt_neox": 1}  # the parallel residual sums both partials before one reduction


def write_checkpoint(family: str, out: Path, tokenizer: Path | None = None) -> Path:
    from transformers import AutoConfig

    fields = dict(FAMILIES[family])
    model_type = fields.pop("model_type")
    layers = {"n_layer": LAYERS} if model_type == "gpt2" else {"num_hidden_layers": LAYERS}
    limits = {} if model_type == "gpt2" else {"max_position_embeddings": 256}
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **layers, **limits, **fields
    )
    return random_checkpoint(config, out, tokenizer, vector_std=0.1)  # random biases and norms too


@dataclass
class Family:
    name: str
    path: Path
    model: Any
    captured: CapturedModel
    sims: dict[int, Simulator] = field(default_factory=dict)

    def sim(self, tp: int) -> Simulator:
        """The planned, lowered ranks at ``tp`` (shared by the tests: planning is most of their time)."""
        if tp not in self.sims:
            self.sims[tp] = Simulator(self.captured, tp)
        return self.sims[tp]


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM

    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            path = write_checkpoint(name, tmp_path_factory.mktemp(name))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            cache[name] = Family(name, path, model, load_hf(path, max_seq_len=MAX_SEQ))
        return cache[name]

    return get


def _logits(outs: list[list[torch.Tensor]]) -> torch.Tensor:
    """The whole logits from every rank's output (vocabulary shards are concatenated)."""
    first = outs[0][0]
    return first if first.shape[-1] == VOCAB else torch.cat([o[0] for o in outs], -1)


def _layer_counts(prop: Any) -> tuple[Counter[str], Counter[str]]:
    """Collectives of the manifest by op, and all-reduces by decoder layer (from their module scope)."""
    entries = collective_entries(prop)
    per_layer: Counter[str] = Counter()
    for e in entries:
        match = re.search(r"\.(\d+)(\.|$)", e.scope)
        if e.op == "all_reduce" and match:
            per_layer[match.group(1)] += 1
    return Counter(e.op for e in entries), per_layer


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_transformers(family: str, tp: int, families: Any) -> None:
    fam = families(family)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(tp))
    with torch.no_grad():
        want = fam.model(ids).logits
    sim = fam.sim(tp)
    prefill = _logits(sim.run([ids[:, :5], torch.arange(5)]))
    decode = [_logits(sim.run([ids[:, t : t + 1], torch.tensor([t])])) for t in (5, 6)]
    torch.testing.assert_close(torch.cat([prefill, *decode], 1), want, atol=1e-5, rtol=0)

    ops, per_layer = _layer_counts(sim.prop)
    if tp == 1:
        assert ops == Counter()
        return
    per = ALL_REDUCES_PER_LAYER.get(family, 2)
    assert ops == Counter(all_reduce=per * LAYERS + 1)  # + the vocabulary-parallel embedding
    assert per_layer == Counter({str(i): per for i in range(LAYERS)})
    names = fam.captured.state_names()
    replicated = [
        names[n] for n, pl in sim.prop.roots.items() if len(n.meta["val"].shape) == 2 and pl == Replicate()
    ]
    assert replicated == []


def _stored(fam: Family, tp: int, suffix: str) -> Any:
    sim = fam.sim(tp)
    return next(pl for n, pl in sim.prop.roots.items() if fam.captured.state_names()[n].endswith(suffix))


@pytest.mark.parametrize(
    ("family", "tp", "query"), [("gemma_mqa", 3, (64, 32, 32)), ("llama_mqa", 2, (48, 48))]
)
def test_one_kv_head_is_held_by_every_rank(
    family: str, tp: int, query: tuple[int, ...], families: Any
) -> None:
    """Multi-query attention: query heads split, the single KV head (its projections and its cache) on
    every rank as an overlapping split, not cut and not gathered."""
    fam = families(family)
    head = 32 if family == "gemma_mqa" else 16
    assert _stored(fam, tp, "layers.0.self_attn.q_proj.weight") == Shard(0, query)
    kv = Shard(0, (head,) * tp, (0,) * tp)
    assert _stored(fam, tp, "layers.0.self_attn.k_proj.weight") == kv
    assert _stored(fam, tp, "layers.0.self_attn.v_proj.weight") == kv
    assert _stored(fam, tp, "kv_cache.key_0") == Shard(1, (1,) * tp, (0,) * tp)


def test_fused_projections_are_stored_as_per_rank_pieces(families: Any) -> None:
    """Each third of GPT-2's c_attn ([in, 3 * 96], Conv1D) is split by heads: rank r holds [q_r; k_r; v_r]."""
    c_attn = _stored(families("gpt2"), 3, "h.0.attn.c_attn.weight")
    thirds = Shard(1, (32, 32, 32))
    assert c_attn == Pieces(1, ((0, 96, thirds), (96, 192, thirds), (192, 288, thirds)))
    # Phi-3: 12 query heads and 4 KV heads of 8 in one qkv_proj; gate and up halves of gate_up_proj
    qkv = _stored(families("phi3"), 4, "layers.0.self_attn.qkv_proj.weight")
    q, kv = Shard(0, (24,) * 4), Shard(0, (8,) * 4)
    assert qkv == Pieces(0, ((0, 96, q), (96, 128, kv), (128, 160, kv)))
    gate_up = _stored(families("phi3"), 3, "layers.0.mlp.gate_up_proj.weight")
    half = Shard(0, (54, 53, 53))
    assert gate_up == Pieces(0, ((0, 160, half), (160, 320, half)))


def _greedy_simulated(sim: Simulator, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    out: list[int] = []
    logits = _logits(sim.run([prompt, torch.arange(prompt.shape[1])]))
    for pos in range(prompt.shape[1], prompt.shape[1] + new_tokens):
        out.append(int(logits[0, -1].argmax()))
        logits = _logits(sim.run([torch.tensor([[out[-1]]]), torch.tensor([pos])]))
    return out


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_equal_transformers(family: str, tp: int, families: Any) -> None:
    fam = families(family)
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = fam.model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, top_k=None, top_p=None
        )
    want = [int(t) for t in ref[0, 6:]]
    assert _greedy_simulated(fam.sim(tp), prompt, 8) == want


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_gpt2_tp3_on_real_processes(tokenizer_dir: Path, tmp_path: Path) -> None:
    """``tpcompile`` + ``tprun`` (gloo): greedy tokens equal transformers'; the manifest shows the pieces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = write_checkpoint("gpt2", tmp_path / "gpt2", tokenizer_dir)
    out, saved = tmp_path / "out", tmp_path / "tokens.json"
    compiled = tpcompile(ckpt, "--tp", "3", "-o", out, "--max-seq-len", "64", "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    ran = tprun(out, "--prompt", "Why is the sky blue?", "--max-new-tokens", "16", "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(saved.read_text())[0]
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([result["prompt_ids"]]), max_new_tokens=16, do_sample=False, top_k=None, top_p=None
        )
    assert result["new_ids"] == [int(t) for t in ref[0, len(result["prompt_ids"]) :]]
    assert ran.stdout == AutoTokenizer.from_pretrained(str(ckpt)).decode(result["new_ids"]) + "\n"

    manifest = json.loads((out / "manifest.json").read_text())
    ops = Counter(c["op"] for c in manifest["collectives"])
    assert ops == Counter(all_reduce=2 * LAYERS + 1)
    params = {p["name"]: p for p in manifest["parameters"]}
    c_attn = params["hf.transformer.h.0.attn.c_attn.weight"]
    assert c_attn["plan"] == "fused-colwise"
    assert c_attn["placement"] == "B(1;0:96=S(1;32,32,32)|96:192=S(1;32,32,32)|192:288=S(1;32,32,32))"
    assert params["hf.transformer.h.0.attn.c_proj.bias"]["placement"] == "P"  # added once, on rank 0
    c_proj = params["hf.transformer.h.0.attn.c_proj.weight"]  # Conv1D [in, out]: its input dim is split
    assert (c_proj["plan"], c_proj["placement"]) == ("rowwise", "S(0;32,32,32)")


class FusedBlock(torch.nn.Module):
    """Plain PyTorch: one biased qkv projection split with uneven sizes (6 query / 2 KV heads of 8), one
    gate/up projection chunked in two."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(48)
        self.qkv = torch.nn.Linear(48, 48 + 2 * 16)
        self.o = torch.nn.Linear(48, 48)
        self.gate_up = torch.nn.Linear(48, 2 * 40, bias=False)
        self.down = torch.nn.Linear(40, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).split([48, 16, 16], dim=-1)
        q, k, v = (y.view(b, t, -1, 8).transpose(1, 2) for y in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, 48))
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("tp", [2, 3])
def test_fused_projections_in_a_plain_module(tp: int) -> None:
    from tests.test_passes import capture, check

    captured = capture(FusedBlock(), torch.randn(2, 5, 48))
    check(captured, tp, torch.randn(2, 5, 48))
    names = captured.state_names()
    sim = Simulator(captured, tp)
    roots = {names[n]: pl for n, pl in sim.prop.roots.items()}
    assert isinstance(roots["qkv.weight"], Pieces) and isinstance(roots["qkv.bias"], Pieces)
    assert all(isinstance(pl, Shard) for _, _, pl in roots["qkv.weight"].parts)
    assert [red.collective for red, _ in sim.prop.collectives()] == ["all_reduce", "all_reduce"]
