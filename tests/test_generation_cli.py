"""``tprun --prompt`` / stdin prompts on hand-built causal-LM artifacts, through real spawned gloo ranks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_code, tprun, write_manifest
from tests.test_lm_runtime_helpers import EOS, build_lm_artifact, full_weights, reference_generate

SUMMARY = re.compile(
    r"^prompt tokens: (\d+) \| new tokens: (\d+) \| time to first token: \d+\.\d{3} s \| "
    r"decode: \d+\.\d tokens/s$",
    re.MULTILINE,
)


def _tokenizer(art: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(art / "tokenizer"))


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


@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm_artifact(tmp_path_factory.mktemp("lm2") / "art", [130, 129], max_seq_len=24)


def test_prompt_tp2_streams_reference_tokens(tp2: Path, tmp_path: Path) -> None:
    text = "héllo wörld"
    saved = tmp_path / "ids.json"
    proc = tprun(tp2, "--prompt", text, "--no-chat-template", "--max-new-tokens", "9", "--save-tokens", saved)
    assert proc.returncode == 0, proc.stderr
    tok = _tokenizer(tp2)
    [entry] = json.loads(saved.read_text())
    assert entry["prompt_ids"] == tok(text)["input_ids"]  # plain tokenization, BOS added by the tokenizer
    expected = reference_generate(full_weights(259), entry["prompt_ids"], 9, 24, {EOS})
    assert entry["new_ids"] == expected and len(expected) == 9
    assert proc.stdout == tok.decode(expected, skip_special_tokens=True) + "\n"
    assert [m.groups() for m in SUMMARY.finditer(proc.stderr)] == [(str(len(entry["prompt_ids"])), "9")]
    assert "[rank" not in proc.stderr


def test_prompt_too_long_is_one_line_exit_2(tp2: Path) -> None:
    proc = tprun(tp2, "--prompt", "x" * 30, "--no-chat-template")
    assert proc.returncode == 2, proc.stderr
    message = (
        "tprun: error: prompt has 31 tokens but the artifact's KV cache holds 24 "
        "(compile with a larger --max-seq-len)"
    )
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [message]
    assert proc.stdout == ""


_SESSION_PROBE = """
import sys
from dataclasses import replace
from tpcompile.runtime.format.manifest import load_artifact_manifest
from tpcompile.runtime.lm.session import GenerationArgs, GenerationSession

manifest = load_artifact_manifest(sys.argv[1])
plain = GenerationArgs(chat_template=False)
args = replace(plain, prompts=("hello",)) if sys.argv[4] == "prompt" else replace(plain, read_stdin=True)
session = GenerationSession(manifest, args, int(sys.argv[2]), local_rank=int(sys.argv[3]))
print(len(session.fixed_prompts()), session.tokenizer is not None, "transformers" in sys.modules)
"""


@pytest.mark.parametrize(
    ("rank", "local_rank", "source", "probed"),
    [
        (0, 0, "prompt", "1 True True"),  # rank 0 encodes for every rank
        (1, 1, "prompt", "0 False False"),  # gets rank 0's ids once connected: no transformers at all
        (2, 0, "prompt", "1 True True"),  # the first rank of another host checks the prompt itself
        (0, 0, "stdin", "0 True True"),
        (2, 0, "stdin", "0 False False"),  # stdin lines are read and encoded by rank 0 only
    ],
)
def test_only_rank_0_tokenizes_for_the_job(
    tp2: Path, rank: int, local_rank: int, source: str, probed: str
) -> None:
    proc = run_code(_SESSION_PROBE, tp2, rank, local_rank, source)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == probed


def test_prompt_on_generic_artifact_is_refused(tp2: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(tp2, tmp_path / "art"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["kind"] = "generic"
    write_manifest(art, manifest)
    message = (
        f"tprun: error: {art} is a 'generic' artifact, not a causal LM: text prompts need an artifact "
        "compiled as a causal LM; run this one with --inputs IN.safetensors -o OUT.safetensors\n"
    )
    proc = tprun(art, "--prompt", "hi")
    assert (proc.returncode, proc.stderr) == (2, message)
    proc = _stdin_tprun(art, stdin="hi\n")
    assert (proc.returncode, proc.stderr) == (2, message)


def test_corrupt_tokenizer_file_is_reported(tp2: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(tp2, tmp_path / "art"))
    path = art / "tokenizer" / "tokenizer.json"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    proc = tprun(art, "--prompt", "hi")
    assert (proc.returncode, proc.stderr) == (2, "tprun: error: artifact corrupt: tokenizer/tokenizer.json\n")
