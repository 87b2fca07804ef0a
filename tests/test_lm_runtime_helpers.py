"""A hand-built causal-LM artifact (no compiler) and single-process tests of how the runtime loads it.

The model is tiny but uses its KV cache the way compiled LMs do: ``index_copy_`` of the new positions into a
``zero_state`` buffer, attention over cached positions <= the current one (stale entries are masked), and a
vocabulary-sharded head whose per-rank logits are the program output (``S(2;sizes)``, uneven, optionally
padded past ``vocab_size``). The tokenizer is byte-level (multi-byte characters span several tokens) with a
chat template.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tests.conftest import write_manifest
from tpcompile.runtime import ArtifactCorrupt, ArtifactLoadError, CausalLM, load_artifact_manifest, load_rank
from tpcompile.runtime.format import Shard

D = 8
BATCH = 2
SPECIALS = ["<s>", "</s>", "<pad>"]
VOCAB = 256 + len(SPECIALS)
BOS, EOS, PAD = 256, 257, 258
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


class _Cache(nn.Module):
    def __init__(self, max_seq_len: int) -> None:
        super().__init__()
        self.register_buffer("key_0", torch.empty(BATCH, max_seq_len, D))


class TinyLM(nn.Module):
    """Embedding -> one cached attention read -> tanh -> this rank's slice of the vocabulary head."""

    def __init__(self, vocab_local: int, max_seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.empty(VOCAB, D))
        self.head = nn.Parameter(torch.empty(vocab_local, D))
        self.cache = _Cache(max_seq_len)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed)
        keys = self.cache.key_0
        keys.index_copy_(1, cache_position, h)
        slots = torch.arange(keys.shape[1], device=input_ids.device)
        visible = slots[None, :] <= cache_position[:, None]
        scores = torch.einsum("btd,bsd->bts", h, keys).masked_fill(~visible, float("-inf"))
        context = scores.softmax(dim=-1) @ keys
        return torch.tanh(h + context) @ self.head.T


def full_weights(padded_vocab: int, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(VOCAB, D, generator=gen),
        "head": torch.randn(padded_vocab, D, generator=gen) * 3.0,
    }


def reference_generate(
    weights: dict[str, torch.Tensor], prompt: list[int], max_new: int, max_seq_len: int, eos: set[int]
) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step (no cache reuse), full vocabulary."""
    model = TinyLM(VOCAB, max_seq_len)
    model.embed.data = weights["embed"]
    model.head.data = weights["head"][:VOCAB]
    ids = list(prompt)
    new: list[int] = []
    limit = min(max_new, max_seq_len - len(prompt))
    with torch.no_grad():
        while len(new) < limit and (not new or new[-1] not in eos):
            model.cache.key_0.zero_()
            logits = model(torch.tensor([ids] * BATCH), torch.arange(len(ids)))
            new.append(int(logits[0, -1].argmax()))
            ids.append(new[-1])
    return new


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: b for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = 256 + len(table) - len(printable)
    return [chr(table[b]) for b in range(256)]


def byte_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer without merges (token id == UTF-8 byte value), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_gpt2_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_lm_artifact(
    root: Path,
    sizes: list[int],
    *,
    max_seq_len: int = 48,
    eos: list[int] | None = None,
    seed: int = 7,
    with_tokenizer: bool = True,
) -> Path:
    """Write a causal_lm artifact with ``len(sizes)`` ranks; rank r's head rows are the r-th slice."""
    tp = len(sizes)
    weights = full_weights(sum(sizes), seed)
    root.mkdir(parents=True)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    ranks: list[dict[str, Any]] = []
    offset = 0
    for rank, size in enumerate(sizes):
        with torch.device("meta"):
            model = TinyLM(size, max_seq_len)
        example = (torch.zeros(BATCH, 3, dtype=torch.long, device="meta"), torch.arange(3, device="meta"))
        program = torch.export.export(model, example, dynamic_shapes=({1: seq}, {0: seq}))
        rank_dir = root / f"rank{rank}"
        rank_dir.mkdir()
        torch.export.save(program, str(rank_dir / "program.pt2"))
        shard = {"embed": weights["embed"], "head": weights["head"][offset : offset + size].clone()}
        save_file(shard, str(rank_dir / "weights.safetensors"))
        offset += size
        files = {n: _sha256(rank_dir / n) for n in ("program.pt2", "weights.safetensors")}
        ranks.append({"rank": rank, "dir": f"rank{rank}", "weight_bytes": 0, "files": files})
    shared: dict[str, str] = {}
    if with_tokenizer:
        tok_dir = byte_tokenizer(root / "tokenizer")
        shared = {f"tokenizer/{p.name}": _sha256(p) for p in sorted(tok_dir.iterdir())}
    lm = {
        "vocab_size": VOCAB,
        "max_seq_len": max_seq_len,
        "max_batch_size": BATCH,
        "eos_token_ids": [EOS] if eos is None else eos,
        "bos_token_id": BOS,
        "pad_token_id": PAD,
        "tokenizer": "tokenizer" if with_tokenizer else None,
        "chat_template": with_tokenizer,
        "generation": {"do_sample": False},
    }
    manifest = {
        "format_version": 1,
        "kind": "causal_lm",
        "tp": tp,
        "group_name": "tp",
        "dtype": "float32",
        "tool": {"name": "tpcompile", "version": "0.1.0"},
        "torch_version": torch.__version__,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [BATCH, "s0"]},
            {"name": "cache_position", "dtype": "int64", "shape": ["s0"]},
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": [BATCH, "s0", sum(sizes)],
                "placement": f"S(2;{','.join(map(str, sizes))})",
            }
        ],
        "zero_state": ["cache.key_0"],
        "shared_files": shared,
        "parameters": [],
        "collectives": [],
        "ranks": ranks,
        "extra": {"lm": lm},
    }
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm_artifact(tmp_path_factory.mktemp("lm") / "art", [130, 129], max_seq_len=24)


# --------------------------------------------------------------------------- single-process tests


def test_manifest_lm_fields(lm_artifact: Path) -> None:
    manifest = load_artifact_manifest(lm_artifact)
    assert manifest.is_causal_lm and manifest.lm is not None
    assert manifest.lm.vocab_size == VOCAB and manifest.lm.max_seq_len == 24
    assert manifest.lm.eos_token_ids == (EOS,) and manifest.lm.tokenizer == "tokenizer"
    assert manifest.zero_state == ("cache.key_0",)
    placement = manifest.outputs[0].placement
    assert isinstance(placement, Shard) and (placement.dim, placement.sizes) == (2, (130, 129))
    assert (placement.offset(1), placement.sizes[1], str(placement)) == (130, 129, "S(2;130,129)")
    assert "tokenizer/tokenizer.json" in manifest.shared_files


def test_loader_creates_zero_state_and_tp1_generation_matches_reference(tmp_path: Path) -> None:
    art = build_lm_artifact(tmp_path / "art", [VOCAB], max_seq_len=16, with_tokenizer=False)
    program = load_rank(art, 0)
    cache = program.module.get_buffer("cache.key_0")
    assert cache.device.type == "cpu" and cache.shape == (BATCH, 16, D) and not cache.any()
    lm = CausalLM(program)  # tp=1: no process group needed
    prompt = [BOS, 72, 105, 33]
    got = lm.generate(prompt, max_new_tokens=100)
    assert len(got) == 16 - len(prompt)  # stops when the cache is full
    assert got == reference_generate(full_weights(VOCAB), prompt, 100, 16, {EOS})
    assert lm.last_stats is not None and lm.last_stats.new_tokens == len(got)
    # A second, different prompt reuses the dirty cache from position 0.
    assert lm.generate([BOS, 1, 2], max_new_tokens=5) == reference_generate(
        full_weights(VOCAB), [BOS, 1, 2], 5, 16, {EOS}
    )


def test_shared_file_hash_verified_by_loader(lm_artifact: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(lm_artifact, tmp_path / "art"))
    tok = art / "tokenizer" / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[10] ^= 0xFF
    tok.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="^artifact corrupt: tokenizer/tokenizer.json$"):
        load_rank(art, 0)
    load_rank(art, 0, verify=False)


def test_zero_state_naming_unknown_buffer_is_rejected(lm_artifact: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(lm_artifact, tmp_path / "art"))
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    data["zero_state"] = ["cache.value_9"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactLoadError, match="'cache.value_9' that the program does not define"):
        load_rank(art, 0, verify=False)
