"""The planner weighs exact plans with the cost model (issue 18, ``tpcompile compile --profile``).

A tiny HF Llama (2 layers, SmolLM2 tokenizer) at tp=2, on two hand-written profiles:
- ``slow-link``: collectives cost 20 ms each. Keeping a chain class whole (every layer's attention, or its
  MLP) saves one all-reduce per layer, so the chosen plan keeps them whole; it is still exact: ``tpcompile
  verify`` against the checkpoint is OK and the greedy tokens equal transformers'. The manifest and
  ``explain`` list every candidate weighed, the chosen one marked.
- ``slow-memory``: collectives are free and weights stream at 10 MB/s: the search's plan (every chain split)
  is kept, with the same placements as a compile without ``--profile``.
- a Llama with SmolLM2's head layout (9 query heads over 3 KV heads) on ``slow-memory``: the search splits
  the heads 6+3 along whole KV groups; the balanced 5+4 split (the middle KV head held by both ranks, each
  rank attending once per KV head with the query heads it serves) streams fewer bytes on the slowest rank,
  so it is chosen, and it is exact (verify OK, transformers' greedy tokens).
- an unknown profile is a one-line usage error (exit 2), nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tpcompile, tprun
from tests.lm_runtime_helpers import MAX_NEW, hf_generate, hf_model, tiny_llama_artifact

PROFILE = """
name = "{name}"
description = "test profile"
predicted = true
[device]
memory_gib = 4
memory_bandwidth_gbs = {{"1" = {bandwidth}, "2" = {bandwidth}}}
peak_tflops = 1
op_overhead_us = 0
max_ranks_per_node = 2
[link]
latency_us = {latency}
bandwidth_gbs = 10
"""


def _profile(tmp: Path, name: str, bandwidth: float, latency: float) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(PROFILE.format(name=name, bandwidth=bandwidth, latency=latency))
    return path


def _manifest(art: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((art / "manifest.json").read_text())


def _all_reduces(m: dict) -> int:  # type: ignore[type-arg]
    return sum(1 for c in m["collectives"] if c["op"] == "all_reduce")


def _generate_matches_transformers(art: Path, ckpt: Path, tmp: Path) -> None:
    saved = tmp / f"{art.name}-ids.json"
    gen = tprun(art, "--max-new-tokens", str(MAX_NEW), "--no-chat-template", "--save-tokens", saved,
                "--prompt", "Once upon a time")  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    (entry,) = json.loads(saved.read_text())
    _, tok = hf_model(ckpt)
    assert entry["prompt_ids"] == tok("Once upon a time")["input_ids"]
    assert entry["new_ids"] == hf_generate(ckpt, entry["prompt_ids"])


def _verify_ok(art: Path, ckpt: Path) -> None:
    proc = tpcompile("verify", art, "--reference", ckpt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK"), proc.stdout


def _compile(ckpt: Path, out: Path, *extra: str | Path) -> dict:  # type: ignore[type-arg]
    proc = tpcompile(ckpt, "--tp", "2", "-o", out, "--max-seq-len", "96", "--quiet", "--no-native", *extra)
    assert proc.returncode == 0, proc.stderr
    return _manifest(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its tp=2 artifact compiled without a profile)."""
    return tiny_llama_artifact(tmp_path_factory, 2)


def test_slow_collectives_keep_chains_whole_and_stay_exact(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, plain = tiny
    out = tmp_path / "weighed"
    m = _compile(ckpt, out, "--profile", _profile(tmp_path, "slow-link", 10.0, 20000))
    default = _manifest(plain)
    weighed = m["extra"]["plans_weighed"]
    assert weighed["profile"] == "slow-link"
    cands = weighed["candidates"]
    assert cands[0]["kept_whole"] == [] and not cands[0]["chosen"]  # the search's own plan, not taken
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kept_whole"]
    assert chosen[0]["decode_tokens_per_s"] == max(c["decode_tokens_per_s"] for c in cands)
    # each class kept whole removes one all-reduce per layer (2 layers)
    assert _all_reduces(m) == _all_reduces(default) - 2 * len(chosen[0]["kept_whole"])
    assert _all_reduces(m) >= 1  # something is still split: a plan splitting nothing is no candidate
    kept = [name for name, why in m["extra"]["unsplit"].items() if "predicted slower on slow-link" in why]
    assert kept and all(p["placement"] == "R" for p in m["parameters"] if p["name"] in kept)
    # exact: the checkpoint's logits to fp32 round-off, and transformers' greedy tokens
    _verify_ok(out, ckpt)
    _generate_matches_transformers(out, ckpt, tmp_path)
    text = tpcompile("explain", out)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = lines.index("plans weighed on slow-link (the cost model's decode prediction; * = this artifact):")
    rows = lines[head + 1 : head + 1 + len(cands)]
    assert [r.lstrip().startswith("*") for r in rows] == [c["chosen"] for c in cands]
    assert rows[0].endswith("every chain split")


def test_slow_memory_keeps_the_search_plan(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, plain = tiny
    m = _compile(ckpt, tmp_path / "weighed", "--profile", _profile(tmp_path, "slow-memory", 0.01, 0.001))
    cands = m["extra"]["plans_weighed"]["candidates"]
    assert cands[0]["chosen"] and cands[0]["kept_whole"] == [] and len(cands) > 1
    assert all(c["decode_tokens_per_s"] < cands[0]["decode_tokens_per_s"] for c in cands[1:])
    default = _manifest(plain)
    placements = {p["name"]: p["placement"] for p in m["parameters"]}
    assert placements == {p["name"]: p["placement"] for p in default["parameters"]}
    assert _all_reduces(m) == _all_reduces(default)


def test_balanced_heads_across_kv_groups(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from tests.checkpoints import random_checkpoint, save_smollm2_tokenizer

    ckpt_root = tmp_path_factory.mktemp("heads9")
    # head dim 32, a small MLP and vocabulary (the prompt's ids are below 8192), so that attention is a
    # large enough share of the bytes for the balance to show beyond GAIN
    config = AutoConfig.for_model(
        "llama", hidden_size=288, intermediate_size=64, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=2, max_position_embeddings=256, vocab_size=8192, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    ckpt = random_checkpoint(config, ckpt_root / "ckpt", save_smollm2_tokenizer(ckpt_root / "tok"))
    plain = _compile(ckpt, tmp_path / "plain")
    m = _compile(ckpt, tmp_path / "weighed", "--profile", _profile(tmp_path, "slow-memory", 0.01, 0.001))
    cands = m["extra"]["plans_weighed"]["candidates"]
    assert [(c["balanced"], c["chosen"]) for c in cands[:2]] == [(False, False), (True, True)]
    assert cands[1]["decode_tokens_per_s"] > cands[0]["decode_tokens_per_s"]

    def placement(manifest: dict, name: str) -> str:  # type: ignore[type-arg]
        return next(p["placement"] for p in manifest["parameters"] if p["name"] == name)

    q, k = "hf.model.layers.0.self_attn.q_proj.weight", "hf.model.layers.0.self_attn.k_proj.weight"
    balanced = ("S(0;160,128)", "S(0;64,64@0,32)")  # 5+4 heads, KV heads 0-1 and 1-2 (not 6+3 over 2+1)
    assert (placement(m, q), placement(m, k)) == balanced
    # without a profile too: its largest rank holds fewer bytes than whole KV groups' rank 0
    assert (placement(plain, q), placement(plain, k)) == balanced
    _verify_ok(tmp_path / "weighed", ckpt)
    _generate_matches_transformers(tmp_path / "weighed", ckpt, tmp_path)


def test_unknown_profile_is_a_usage_error(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = tiny
    out = tmp_path / "never"
    proc = tpcompile(ckpt, "--tp", "2", "-o", out, "--profile", "dgx-9000", "--quiet")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("tpcompile: error: unknown hardware profile 'dgx-9000'; known: ")
    assert not out.exists()
