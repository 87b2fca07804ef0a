"""Options that only apply to language-model frontends (Hugging Face checkpoints, GGUF files)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LanguageModelOptions:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    max_seq_len: int | None = None  # KV cache length; None: min(model limit, 4096)
    max_batch_size: int = 1
    dequantize: bool = False  # GGUF: store quantized tensors as floats (no packed weights)
