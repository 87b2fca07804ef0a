"""``tpcompile verify`` on language-model artifacts (issue 16, "verify"): CLI runs on a tiny random Llama.

- A causal LM is fed a prefill of random ids at positions 0..L-1 on a fresh KV cache (its shared-position
  contract, and its independent-rows contract with ``--max-batch-size 2``): OK at tp=2 with an fp32
  round-off error, the reference being the checkpoint's own weights.
- ``--quantize int8`` / ``int4``: the reference is the original with its weights quantize-dequantized as
  the compile did; OK at fp32 round-off, and the report says so.
- A wrong reference is a MISMATCH (exit 1); a NaN written into a weight shard behind the artifact's back
  (hashes re-signed) is a MISMATCH that names the NaN, never an error of 0; a shard whose bytes no longer
  match its hash is refused as corrupt (exit 2).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tpcompile, write_manifest
from tpcompile.verify import compare

pytest.importorskip("transformers")

SEQ_LEN = 32  # KV cache positions: the prefill is 16 tokens
PREFILL = "inputs: a prefill of 16 random token ids at positions 0..15 (seed 0), fresh KV cache"
ROUND_OFF = 1e-4


def _config(**changes: object) -> object:
    from transformers import AutoConfig

    fields: dict[str, object] = dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(changes)
    return AutoConfig.for_model("llama", **fields)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import random_checkpoint

    return random_checkpoint(_config(), tmp_path_factory.mktemp("llama") / "ckpt", std=0.05)


@pytest.fixture(scope="module")
def compiled(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``--quantize`` argument ("" for none) -> the tiny Llama compiled at tp=2, on first use."""
    root = tmp_path_factory.mktemp("verify")

    class Lazy(dict):
        def __missing__(self, key: str) -> Path:
            out = root / (key.replace(" ", "-") or "fp32")
            extra = key.split() if key else []
            proc = tpcompile(
                llama, "--tp", "2", "-o", out, "--max-seq-len", str(SEQ_LEN), "--quiet", "--no-native", *extra
            )
            assert proc.returncode == 0, proc.stderr
            self[key] = out
            return out

    return Lazy()


def _verify(art: Path, reference: Path) -> tuple[int, list[str]]:
    proc = tpcompile("verify", art, "--reference", reference)
    assert "error" not in proc.stderr, proc.stderr  # (torch may warn on a rank's stderr)
    return proc.returncode, proc.stdout.splitlines()


def _errors(line: str) -> tuple[float, float]:
    found = re.fullmatch(
        r"OK: max abs error (\S+) \(atol 0\.0001\), max rel error (\S+) \(rtol 0\.0001\)", line
    )
    assert found, line
    return float(found[1]), float(found[2])


def test_lm_prefill_at_tp2_is_ok(compiled: dict[str, Path], llama: Path) -> None:
    code, lines = _verify(compiled[""], llama)
    assert code == 0, lines
    max_abs, _ = _errors(lines[0])
    assert 0 <= max_abs <= ROUND_OFF
    assert lines[1:] == ["reference: the original weights", PREFILL]


def test_independent_rows_get_a_prefill_in_every_row(compiled: dict[str, Path], llama: Path) -> None:
    code, lines = _verify(compiled["--max-batch-size 2"], llama)
    assert code == 0, lines
    assert _errors(lines[0])[0] <= ROUND_OFF
    assert lines[2] == PREFILL.replace("0..15", "0..15 in each of 2 rows")


@pytest.mark.parametrize(
    ("quantize", "fmt"), [("--quantize int8", "int8"), ("--quantize int4", "int4_g32")], ids=["int8", "int4"]
)
def test_quantized_artifact_agrees_with_the_dequantized_original(
    quantize: str, fmt: str, compiled: dict[str, Path], llama: Path
) -> None:
    art = compiled[quantize]
    quant = json.loads((art / "manifest.json").read_text())["extra"]["quant"]
    assert {t["format"] for t in quant["tensors"].values()} == {fmt}
    code, lines = _verify(art, llama)
    assert code == 0, lines
    assert _errors(lines[0])[0] <= ROUND_OFF
    assert lines[1:] == [f"reference: dequantized {fmt} weights", PREFILL]


def test_a_different_model_is_a_mismatch(compiled: dict[str, Path], tmp_path: Path) -> None:
    from tests.checkpoints import random_checkpoint

    other = random_checkpoint(_config(), tmp_path / "other", std=0.06)  # same shapes, other weights
    code, lines = _verify(compiled[""], other)
    assert code == 1, lines
    assert lines[0].startswith("MISMATCH: max abs error ") and not lines[0].startswith(
        "MISMATCH: max abs error 0.000e+00"
    )


def _resigned_copy(art: Path, tmp_path: Path, change: float) -> Path:
    """A copy of ``art`` with a few weights of rank 0's layer-1 down_proj set to ``change``, its hashes
    re-signed: the runtime loads it without complaint."""
    from safetensors.torch import load_file, save_file

    from tpcompile.runtime.format import sha256_file

    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    shard = copy / "rank0" / "weights.safetensors"
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name][0, :4] = change
    save_file(tensors, str(shard))
    data = json.loads((copy / "manifest.json").read_text())
    rank0 = next(r for r in data["ranks"] if r["rank"] == 0)
    rank0["files"]["weights.safetensors"] = sha256_file(shard)
    write_manifest(copy, data)
    return copy


def test_nan_in_a_shard_is_a_mismatch_that_says_so(
    compiled: dict[str, Path], llama: Path, tmp_path: Path
) -> None:
    code, lines = _verify(_resigned_copy(compiled[""], tmp_path, float("nan")), llama)
    assert code == 1, lines
    assert re.fullmatch(
        r"MISMATCH: the artifact's output 'logits' holds NaN or inf \(\d+ of \d+ values\)", lines[0]
    ), lines


def test_a_corrupt_shard_is_refused(compiled: dict[str, Path], llama: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(compiled[""], copy)
    shard = copy / "rank1" / "weights.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = tpcompile("verify", copy, "--reference", llama)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "tpcompile: error: rank 1 failed (exit 2): artifact corrupt: rank1/weights.safetensors"
    ], proc.stderr


def test_nan_on_both_sides_is_not_an_error_of_zero() -> None:
    """What verify reported before: NaN == NaN is neither close nor different, the max error was 0."""
    nan = torch.full((1, 3, 4), float("nan"))
    report = compare([nan], {"logits": nan.clone()}, ["logits"], 1e-5, 1e-4)
    assert not report.ok
    assert report.text() == "MISMATCH: the artifact's output 'logits' holds NaN or inf (12 of 12 values)"
    inf = torch.zeros(2, 2)
    inf[1, 1] = float("inf")
    report = compare([inf], {"y": torch.zeros(2, 2)}, ["y"], 1e-5, 1e-4)
    assert report.text() == "MISMATCH: the reference's output 'y' holds NaN or inf (1 of 4 values)"
    report = compare([torch.zeros(2)], {"y": torch.zeros(3)}, ["y"], 1e-5, 1e-4)
    assert report.text() == "MISMATCH: output 'y' has shape [3], the reference's [2]"
