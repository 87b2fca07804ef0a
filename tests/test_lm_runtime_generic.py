"""The hand-built tp=2 causal LM through the other entry points: the generic tensor path gathers its uneven
vocabulary-sharded logits, the ``generate_text`` API, and ``--prompt`` under torchrun (stdout streaming)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run
from tests.test_generation_cli import SUMMARY
from tests.test_lm_runtime_helpers import (
    BATCH,
    EOS,
    VOCAB,
    TinyLM,
    build_lm_artifact,
    full_weights,
    reference_generate,
)
from tpcompile.runtime import Generation, PromptError, generate_text, run_artifact

SIZES = [130, 129]


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm_artifact(tmp_path_factory.mktemp("lm") / "art", SIZES, max_seq_len=48)


def test_run_artifact_gathers_uneven_sharded_logits(art: Path) -> None:
    ids = torch.randint(0, VOCAB, (BATCH, 5))
    out = run_artifact(art, {"input_ids": ids, "cache_position": torch.arange(5)}, backend="gloo")
    weights = full_weights(sum(SIZES))
    model = TinyLM(VOCAB, 48)
    model.embed.data, model.head.data = weights["embed"], weights["head"]
    model.cache.key_0.zero_()
    with torch.no_grad():
        expected = model(ids, torch.arange(5))
    assert out["logits"].shape == (BATCH, 5, VOCAB)
    torch.testing.assert_close(out["logits"], expected)


def test_generate_text_api(art: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art / "tokenizer"))
    result = generate_text(art, "¿qué tal?", max_new_tokens=7)
    assert isinstance(result, Generation)
    messages = [{"role": "user", "content": "¿qué tal?"}]
    assert result.prompt_ids == list(
        tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    )
    assert result.new_ids == reference_generate(full_weights(VOCAB), result.prompt_ids, 7, 48, {EOS})
    assert result.text == tok.decode(result.new_ids, skip_special_tokens=True)
    assert result.stats.prompt_tokens == len(result.prompt_ids) and result.stats.new_tokens == 7
    with pytest.raises(PromptError, match="^prompt has 60 tokens but the artifact's KV cache holds 48 "):
        generate_text(art, list(range(60)), max_new_tokens=2)


def test_prompt_under_torchrun_streams_from_rank_0(art: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    saved = tmp_path / "ids.json"
    proc = run(
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--log-dir",  # not a torchelastic_* directory left in /tmp
        tmp_path / "torchrun",
        "-m",
        "tpcompile.runtime.cli",
        art,
        "--prompt",
        "ünïcode",
        "--no-chat-template",
        "--max-new-tokens",
        "8",
        "--save-tokens",
        saved,
    )
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(saved.read_text())
    tok = AutoTokenizer.from_pretrained(str(art / "tokenizer"))
    assert entry["prompt_ids"] == tok("ünïcode")["input_ids"]
    assert entry["new_ids"] == reference_generate(full_weights(VOCAB), entry["prompt_ids"], 8, 48, {EOS})
    assert proc.stdout == tok.decode(entry["new_ids"], skip_special_tokens=True) + "\n"
    assert len(SUMMARY.findall(proc.stderr)) == 1
