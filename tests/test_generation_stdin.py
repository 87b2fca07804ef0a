"""``tprun`` reading prompts from stdin on a tp=3 hand-built causal LM whose vocabulary shards are padded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cli_env, write_manifest
from tests.test_generation_cli import SUMMARY
from tests.test_lm_runtime_helpers import EOS, build_lm_artifact, full_weights, reference_generate


def _stdin_tprun(*args: str | Path, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpcompile.runtime.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=300,
    )


def test_stdin_prompts_tp3_padded_vocab_chat_template_and_eos(tmp_path: Path) -> None:
    """Shards 87,87,87 cover 261 > 259 ids: the padding is never chosen. EOS stops an answer early.

    Blank lines are skipped; a prompt too long for the cache is reported once and skipped, and the
    run then exits 2.
    """
    from transformers import AutoTokenizer

    art = build_lm_artifact(tmp_path / "art", [87, 87, 87], max_seq_len=40)
    tok = AutoTokenizer.from_pretrained(str(art / "tokenizer"))
    prompts = ["abc", "second prompt"]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    ids = [list(tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False)) for m in messages]
    free = [reference_generate(full_weights(261), p, 6, 40, set()) for p in ids]
    stop = free[0][2]  # make the third token of the first answer an EOS id
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["extra"]["lm"]["eos_token_ids"] = [EOS, stop]
    write_manifest(art, manifest)
    expected = [reference_generate(full_weights(261), p, 6, 40, {EOS, stop}) for p in ids]
    assert expected[0] == free[0][: free[0].index(stop) + 1]

    long_prompt = "y" * 30
    long_ids = tok.apply_chat_template(
        [{"role": "user", "content": long_prompt}], add_generation_prompt=True, return_dict=False
    )
    saved = tmp_path / "ids.json"
    stdin = f"abc\n\n  \n{long_prompt}\nsecond prompt\n"
    proc = _stdin_tprun(art, "--max-new-tokens", "6", "--save-tokens", saved, stdin=stdin)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        f"tprun: error: prompt has {len(long_ids)} tokens but the artifact's KV cache holds 40 "
        "(compile with a larger --max-seq-len)"
    ]
    got = json.loads(saved.read_text())
    assert [e["prompt_ids"] for e in got] == ids
    assert [e["new_ids"] for e in got] == expected
    assert proc.stdout == "".join(tok.decode(e, skip_special_tokens=True) + "\n" for e in expected)
    assert [int(m.group(2)) for m in SUMMARY.finditer(proc.stderr)] == [len(e) for e in expected]
