"""``tprun`` reading prompts from stdin on a tp=3 hand-built causal LM whose vocabulary shards are padded."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm_artifact(tmp_path_factory.mktemp("stdin") / "art", [130, 129], max_seq_len=40)


def _bytes_tprun(art: Path, stdin: bytes, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "tpcompile.runtime.cli", str(art), "--max-new-tokens", "2", *map(str, args)],
        input=stdin,
        capture_output=True,
        env=cli_env(),
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("data", "line_2", "whole"),
    [
        (
            b"abc\n\xff\xfe rest\n",
            "is not UTF-8 text (byte 0xff at offset 0)",
            "is not UTF-8 text (byte 0xff at offset 4)",
        ),
        (
            b"abc\nhello\x00world\n",
            "is binary data, not text (character 0x00 at 5)",
            "is binary data, not text (character 0x00 at 9)",
        ),
    ],
    ids=["undecodable", "binary"],
)
def test_stdin_that_is_not_text_is_refused_before_any_rank_starts(
    art: Path, tmp_path: Path, data: bytes, line_2: str, whole: str
) -> None:
    """A pipe's prompts are read and checked by tprun itself, like --prompt-file: no rank starts (one line
    on stderr, nothing answered, no tokens file)."""
    proc = _bytes_tprun(art, data, "--save-tokens", tmp_path / "ids.json")
    message = f"tprun: error: stdin line 2 {line_2}\n"
    assert (proc.returncode, proc.stderr.decode(), proc.stdout) == (2, message, b"")
    assert not (tmp_path / "ids.json").exists()
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(data)
    proc = _bytes_tprun(art, b"", "--prompt-file", prompt_file)
    message = f"tprun: error: prompt file {prompt_file} {whole}\n"
    assert (proc.returncode, proc.stderr.decode(), proc.stdout) == (2, message, b"")


def test_terminal_lines_that_are_not_text_are_reported_once_and_skipped(art: Path, tmp_path: Path) -> None:
    """From a terminal prompts are answered as they are typed, so rank 0 checks each line: a bad one is
    reported once (not once per rank) and skipped, the next is answered, and the run exits 2."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpcompile.runtime.cli", str(art), "--max-new-tokens", "2"],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
            cwd=REPO,
        )
        os.close(terminal)
        os.write(controller, b"\xff\xfe\nabc\n\x04")  # a bad line, a good one, Ctrl-D
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(controller)
    lines = err.decode().splitlines()
    assert proc.returncode == 2, err
    assert lines[:2] == [
        "tprun: reading prompts from stdin, one per line (end with Ctrl-D)",
        "tprun: error: stdin line 1 is not UTF-8 text (byte 0xff at offset 0)",
    ]
    assert len(lines) == 3 and SUMMARY.match(lines[2]), err  # the good line's summary
    assert len(out.decode().splitlines()) == 1  # its answer
