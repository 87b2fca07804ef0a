"""Mixture of experts (Mixtral, Qwen2-MoE with its gated shared expert) in both modes: ``--moe tp`` (every
expert split like an MLP) and ``--moe ep`` (whole experts per rank, uneven counts allowed).

The sweep over tp = 1..4 runs every rank's program in process (``tests/simulate.py``: collectives replaced
by their definition); one real ``tpcompile`` + ``tprun`` per mode checks the artifact and the runtime.
References are transformers' own models loaded from the same checkpoint (its sparse expert loop).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import simulate
from tests.checkpoints import random_checkpoint, save_smollm2_tokenizer
from tests.conftest import tpcompile, tprun
from tpcompile.compiler import plan_model
from tpcompile.explain import explain

LAYERS = 2
CONFIGS: dict[str, dict[str, Any]] = {
    # 8 experts, top-2: ep at tp=3 holds 3,3,2 experts; intermediate 48 splits 16,16,16 / 12 x 4
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=64,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    # 6 experts, top-4 (ep at tp=4: 2,2,1,1), a shared expert behind a sigmoid gate, q/k/v biases
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
}
PROMPT_IDS = [1, 345, 2077, 19, 7, 860, 4211, 38, 12]
NEW_TOKENS = 4


def write_checkpoint(family: str, out: Path, tokenizer: Path | None) -> Path:
    from transformers import AutoConfig

    fields = dict(CONFIGS[family])
    config = AutoConfig.for_model(
        str(fields.pop("model_type")),
        num_hidden_layers=LAYERS,
        max_position_embeddings=128,
        vocab_size=49152,
        bos_token_id=1,
        eos_token_id=2,
        **fields,
    )
    return random_checkpoint(config, out, tokenizer)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: write_checkpoint(family, root / family, tokenizer_dir) for family in CONFIGS}


@functools.cache
def _reference(path: str) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits for the prompt and its greedy continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, top_k=None, top_p=None)
    return logits, [int(t) for t in out[0, len(PROMPT_IDS) :]]


@functools.cache
def _captured(path: str) -> Any:
    """One capture per checkpoint: planning leaves the captured graph reusable for every tp and mode."""
    from tpcompile.frontend.hf import load_hf

    return load_hf(Path(path), "fp32", 32)


def _simulated_greedy(
    path: Path, tp: int, moe: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.Tensor, list[int], Any]:
    """Prompt logits and greedy tokens of the compiled ranks, every collective replaced by its definition."""
    captured = _captured(str(path))
    monkeypatch.setattr(simulate, "plan_model", functools.partial(plan_model, moe=moe))
    sim = simulate.Simulator(captured, tp)

    def step(ids: list[int], start: int) -> torch.Tensor:
        outs = sim.run([torch.tensor([ids]), torch.arange(start, start + len(ids))])
        return torch.cat([o[0] for o in outs], dim=-1)  # vocabulary shards -> full logits

    logits = step(PROMPT_IDS, 0)
    tokens: list[int] = []
    last, pos = logits, len(PROMPT_IDS)
    for _ in range(NEW_TOKENS):
        tokens.append(int(last[0, -1].argmax()))
        last = step(tokens[-1:], pos)
        pos += 1
    return logits, tokens, sim.prop


CASES = [
    (f, m, tp) for f in sorted(CONFIGS) for m in ("tp", "ep") for tp in (1, 2, 3, 4) if (m, tp) != ("ep", 1)
]


@pytest.mark.parametrize(("family", "moe", "tp"), CASES)
def test_simulated_ranks_equal_transformers(
    family: str, moe: str, tp: int, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    want_logits, want_tokens = _reference(str(checkpoints[family]))
    logits, tokens, prop = _simulated_greedy(checkpoints[family], tp, moe, monkeypatch)
    assert (logits - want_logits).abs().max().item() < 1e-5
    assert tokens == want_tokens
    # one all-reduce for the embedding, then two per layer (attention, MoE block) in both modes
    reductions = [red.collective for red, _ in prop.collectives()]
    assert reductions == ([] if tp == 1 else ["all_reduce"] * (1 + 2 * LAYERS))
    experts = CONFIGS[family].get("num_local_experts") or CONFIGS[family]["num_experts"]
    layouts = {str(pl) for n, pl in prop.roots.items() if len(n.meta["val"].shape) == 3}
    if tp == 1:
        assert layouts == {"R"}
    elif moe == "ep":  # whole experts per rank, the first ranks taking the remainder
        base, extra = divmod(experts, tp)
        sizes = ",".join(str(base + (r < extra)) for r in range(tp))
        assert layouts == {f"S(0;{sizes})"}
    else:  # gate/up split on the intermediate dim (dim 1), down on its input dim (dim 2)
        assert {pl[:4] for pl in layouts} == {"S(1;", "S(2;"}


def test_ep_refuses_more_ranks_than_experts(checkpoints: dict[str, Path]) -> None:
    from tpcompile.errors import UsageError

    captured = _captured(str(checkpoints["qwen2_moe"]))
    with pytest.raises(
        UsageError, match=r"--moe ep needs at least one expert per rank: .* has 6 experts for tp=7"
    ):
        plan_model(captured, 7, moe="ep")


@pytest.mark.parametrize(("family", "moe", "tp"), [("qwen2_moe", "ep", 2), ("mixtral", "tp", 2)])
def test_tprun_greedy_equals_transformers(
    family: str, moe: str, tp: int, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Real ranks (gloo processes): greedy tokens equal transformers'; the manifest and ``explain`` show
    the mode, the expert layouts and the collectives (2 all-reduces per layer + 1 for the embedding)."""
    from transformers import AutoModelForCausalLM

    ckpt, out = checkpoints[family], tmp_path / "out"
    compiled = tpcompile(ckpt, "--tp", tp, "--moe", moe, "-o", out, "--max-seq-len", 64, "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    assert f"tp={tp}: {1 + 2 * LAYERS} all-reduce, 0 all-gather" in compiled.stdout
    saved = tmp_path / "tokens.json"
    ran = tprun(out, "--prompt", "Hello", "--max-new-tokens", 8, "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(saved.read_text())[0]
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([result["prompt_ids"]]), max_new_tokens=8, do_sample=False, top_k=None, top_p=None
        )
    assert result["new_ids"] == [int(t) for t in ref[0, len(result["prompt_ids"]) :]]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["moe"]["mode"] == moe
    per_layer: dict[str, int] = {}
    for c in manifest["collectives"]:
        assert c["op"] == "all_reduce"
        if ".layers." in c["scope"]:
            layer = c["scope"].split(".layers.")[1].split(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + 1
    assert len(manifest["collectives"]) == 1 + 2 * LAYERS and sorted(per_layer.values()) == [2] * LAYERS
    explained = explain(out)  # in process: ``tpcompile explain`` prints this text
    assert f"mixture of experts (--moe {moe}): " in explained
    if moe == "ep":
        assert manifest["extra"]["moe"]["weights"]["hf.model.layers.0.mlp.experts.down_proj"] == {
            "experts": 6,
            "placement": "S(0;3,3)",
            "experts_per_rank": [3, 3],
        }
        assert "experts per rank [3, 3]" in explained
        assert "each rank holds whole experts" in explained
    else:
        gate = manifest["extra"]["moe"]["weights"]["hf.model.layers.0.mlp.experts.gate_proj"]
        assert gate["placement"] == "S(1;24,24)"
        assert "every expert split like an MLP" in explained
