"""``tprun`` with prompts on stdin (one per line) on the tiny Llama compiled at tp=2 by the real compiler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env
from tests.lm_runtime_helpers import MAX_NEW, SUMMARY, hf_generate, hf_model, tiny_llama_artifact


def test_stdin_prompts_tp2(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiny_llama, art = tiny_llama_artifact(tmp_path_factory, 2)
    saved = art.parent / "stdin_ids.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tpcompile.runtime.cli", str(art), "--max-new-tokens", str(MAX_NEW)]
        + ["--no-chat-template", "--save-tokens", str(saved)],
        input="Once upon a time\nThe quick brown fox\n",
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _, tok = hf_model(tiny_llama)
    entries = json.loads(saved.read_text())
    prompts = ["Once upon a time", "The quick brown fox"]
    assert [e["prompt_ids"] for e in entries] == [tok(p)["input_ids"] for p in prompts]
    expected = [hf_generate(tiny_llama, e["prompt_ids"]) for e in entries]
    assert [e["new_ids"] for e in entries] == expected
    assert proc.stdout == "".join(tok.decode(e, skip_special_tokens=True) + "\n" for e in expected)
    assert len(SUMMARY.findall(proc.stderr)) == 2
