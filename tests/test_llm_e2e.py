"""The LLM path end to end: ``tpcompile CHECKPOINT`` then ``tprun OUT --prompt``, on real gloo processes,
compared token for token with transformers' greedy ``generate`` on the same fp32 weights.

Tiny random-weight Llama (tied embeddings), Mistral (6 query heads over 2 KV heads: tp=3 shares a KV head
between two ranks) and Qwen2 (q/k/v biases, a vocabulary tp=2 does not divide) at tp=2,3, and the real
SmolLM2-135M-Instruct (9 query heads over 3 KV heads) at tp=1..4 from its GGUF file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import TINY_CONFIGS, save_smollm2_tokenizer, smollm2_gguf, tiny_checkpoint
from tests.conftest import tpcompile, tprun

PROMPT = "Why is the sky blue?"
NEW_TOKENS = 64


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_smollm2_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_checkpoint(family, root / family, tokenizer_dir) for family in TINY_CONFIGS}


def _greedy_reference(model: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False, top_k=None, top_p=None
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def _compile_and_generate(source: Path, tp: int, out: Path, max_seq_len: int) -> tuple[dict[str, Any], Any]:
    compiled = tpcompile(source, "--tp", tp, "-o", out, "--max-seq-len", max_seq_len, "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    return _generate(out)


def _generate(out: Path) -> tuple[dict[str, Any], Any]:
    saved = out.parent / f"{out.name}-tokens.json"
    ran = tprun(out, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    assert "prompt tokens: " in ran.stderr and "decode: " in ran.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    return json.loads(saved.read_text())[0], (manifest, ran)


def _check_manifest(manifest: dict[str, Any], tp: int, layers: int, vocab: int) -> None:
    """Two all-reduces per decoder layer, one for the vocabulary-parallel embedding, no all-gather (the
    logits stay vocab-sharded: greedy decoding takes a distributed argmax)."""
    ops = [c["op"] for c in manifest["collectives"]]
    if tp == 1:
        assert ops == []
        return
    assert ops.count("all_gather") == 0
    assert ops.count("all_reduce") == 2 * layers + 1
    per_layer: dict[str, int] = {}
    for c in manifest["collectives"]:
        scope = c["scope"]
        if ".layers." in scope:
            layer = scope.split(".layers.")[1].split(".")[0]
            per_layer[layer] = per_layer.get(layer, 0) + 1
    assert sorted(per_layer.values()) == [2] * layers
    (logits,) = manifest["outputs"]
    sizes = [int(s) for s in logits["placement"].split(";")[1].rstrip(")").split(",")]
    assert logits["placement"].startswith("S(2;") and sum(sizes) == vocab and len(sizes) == tp


@pytest.mark.parametrize("tp", [2, 3])  # tp=1: SmolLM2 (a Llama) below and tests/test_native.py
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_tiny_greedy_equals_transformers(
    family: str, tp: int, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tiny_checkpoints[family]
    result, (manifest, ran) = _compile_and_generate(ckpt, tp, tmp_path / "out", max_seq_len=128)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert result["prompt_ids"] == list(templated)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    want = _greedy_reference(model, result["prompt_ids"], NEW_TOKENS)
    assert result["new_ids"] == want
    assert ran.stdout == tokenizer.decode(want, skip_special_tokens=True) + "\n"
    config = model.config
    _check_manifest(manifest, tp, config.num_hidden_layers, config.vocab_size)


class _CachedReference:
    """transformers' SmolLM2 and its greedy answers, computed once per prompt for all tp values."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self._answers: dict[tuple[int, ...], list[int]] = {}

    def greedy(self, prompt_ids: list[int]) -> list[int]:
        key = tuple(prompt_ids)
        if key not in self._answers:
            self._answers[key] = _greedy_reference(self.model, prompt_ids, NEW_TOKENS)
        return self._answers[key]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_model: Any) -> _CachedReference:
    return _CachedReference(smollm2_model)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_smollm2_greedy_equals_transformers(
    tp: int, smollm2_reference: _CachedReference, compiled_smollm2: Any
) -> None:
    result, (manifest, ran) = _generate(compiled_smollm2(tp))
    want = smollm2_reference.greedy(result["prompt_ids"])
    assert result["new_ids"] == want
    assert len(want) > 16  # a real answer, not an immediate end of turn
    config = smollm2_reference.config
    _check_manifest(manifest, tp, config.num_hidden_layers, config.vocab_size)
    if tp == 2:  # per-rank weight bytes: everything but the norms is split
        assert max(r["weight_bytes"] for r in manifest["ranks"]) / manifest["total_weight_bytes"] <= 0.55
    if tp == 4:  # 3 KV heads on 4 ranks: one KV head is replicated on the two ranks that need it
        k_proj = next(
            p for p in manifest["parameters"] if p["name"].endswith("layers.0.self_attn.k_proj.weight")
        )
        assert "@" in k_proj["placement"]


@pytest.mark.slow
def test_smollm2_native_greedy_equals_transformers(
    smollm2_reference: _CachedReference, tmp_path: Path
) -> None:
    """SmolLM2 at tp=2 on its native programs (AOTInductor packages): the same greedy answer, and every
    rank says (``--profile``) that it ran the native program."""
    out = tmp_path / "native-tp2"
    args = ("--tp", "2", "-o", out, "--max-seq-len", "128", "--native", "--quiet")
    compiled = tpcompile(smollm2_gguf(), *args)
    assert compiled.returncode == 0, compiled.stderr
    saved = tmp_path / "tokens.json"
    ran = tprun(out, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--save-tokens", saved, "--profile")
    assert ran.returncode == 0, ran.stderr
    result = json.loads(saved.read_text())[0]
    assert result["new_ids"] == smollm2_reference.greedy(result["prompt_ids"])
    assert sorted(re.findall(r"^profile rank (\d) \(native program\)", ran.stderr, re.M)) == ["0", "1"]
    assert "warning" not in ran.stderr


def test_checkpoint_that_disagrees_with_its_config_is_refused(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = tpcompile(ckpt, "--tp", "2", "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 3
    assert proc.stderr.strip() == (
        "tpcompile: error: checkpoint tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64] "
        "but the config implies [100, 64]"
    )
    assert not (tmp_path / "out").exists()
