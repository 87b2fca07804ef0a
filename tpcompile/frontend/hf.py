"""Hugging Face causal LMs (a checkpoint directory or a GGUF file) captured for generation.

The model is built without weights (parameters on the meta device; small computed buffers such as rotary
frequencies stay real), wrapped with a static KV cache held as buffers of the wrapper, and captured by
``torch.export`` with a dynamic sequence length: one program ``(input_ids [B, T], cache_position [T]) ->
logits [B, T, V]`` serves prefill and decode and writes the cache in place.

Invariant: every stored tensor of the captured program is either read from the checkpoint (through its tied
aliases if the checkpoint stores only one of them), a computed buffer of the model, or a KV cache buffer
listed in ``zero_state`` (created as zeros by the runtime, never written to the artifact).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel, LanguageModelInfo, captured_program, export_module
from tpcompile.frontend.hf_encoder import is_encoder, load_hf_encoder
from tpcompile.frontend.hf_experts import prepare_experts
from tpcompile.frontend.hf_model import (
    CACHE_PREFIX,
    DTYPES,
    CheckpointReader,
    build_without_weights,
)
from tpcompile.frontend.hf_rows import IndependentRowsLM, KVCacheBuffers, cache_shape, export_rows
from tpcompile.frontend.sources import TensorSource
from tpcompile.runtime.errors import first_line

DEFAULT_MAX_SEQ_LEN = 4096


class CausalLMWithStaticCache(nn.Module):
    """``forward(input_ids, cache_position) -> logits`` with the KV cache written in place."""

    def __init__(self, model: nn.Module, batch: int, max_seq_len: int) -> None:
        super().__init__()
        self.hf = model
        text = model.config.get_text_config(decoder=True)  # type: ignore[union-attr,operator]
        self.text_config = text
        self.max_seq_len = max_seq_len
        self.layers = text.num_hidden_layers
        dtype = next(model.parameters()).dtype
        self.kv_cache = KVCacheBuffers(self.layers, cache_shape(text, batch, max_seq_len), dtype)

    def _cache(self, start: torch.Tensor) -> Any:
        from transformers.cache_utils import StaticCache, StaticLayer

        cache = StaticCache(config=self.text_config, max_cache_len=self.max_seq_len)
        for i in range(len(cache.layers)):
            layer = StaticLayer(self.max_seq_len)
            keys, values = self.kv_cache.get_buffer(f"key_{i}"), self.kv_cache.get_buffer(f"value_{i}")
            layer.keys, layer.values = keys, values
            # `dtype` is read by the transformers releases that declare it (not by 5.24 and later)
            layer.__dict__.update(dtype=keys.dtype, device=keys.device)
            layer.batch_size, layer.num_heads = keys.shape[:2]
            layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
            layer.cumulative_length = start.clone()
            layer.is_initialized = True
            cache.layers[i] = layer
        return cache

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        cache = self._cache(cache_position[0])
        out = self.hf(
            input_ids=input_ids,
            position_ids=cache_position.unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def _model_limit(config: Any) -> int | None:
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


class HFCheckpoint:
    """What the frontend needs from a checkpoint: config, tokenizer, generation defaults, tensors."""

    def __init__(self, path: Path, dequantize: bool = False) -> None:
        self.path = path
        self.gguf: Any = None
        if path.is_file() and path.suffix == ".gguf":
            from tpcompile.frontend.gguf_source import GGUFCheckpoint

            self.gguf = GGUFCheckpoint(path, dequantize)
            self.config = self.gguf.config
            self.tensors: TensorSource = self.gguf
            return
        from transformers import AutoConfig

        from tpcompile.frontend.sources import SafetensorsCheckpoint

        if not (path / "config.json").is_file():
            raise UsageError(f"{path} has no config.json; expected a Hugging Face checkpoint directory")
        try:
            self.config = AutoConfig.from_pretrained(str(path))
        except Exception as err:  # transformers raises ValueError/KeyError/OSError for bad configs
            raise UnsupportedModelError(f"cannot read {path}/config.json: {first_line(err)}") from None
        self.tensors = SafetensorsCheckpoint(path)

    def generation_defaults(self) -> dict[str, Any]:
        if self.gguf is not None:
            return dict(self.gguf.generation_defaults())
        path = self.path / "generation_config.json"
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return {k: v for k, v in data.items() if not k.startswith("_")}

    def save_tokenizer(self, out: Path) -> bool:
        """Write the tokenizer to ``out``; False when the checkpoint has none."""
        if self.gguf is not None:
            self.gguf.save_tokenizer(out)
            return True
        names = [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "chat_template.jinja",
            "chat_template.json",
            "added_tokens.json",
        ]
        present = [n for n in names if (self.path / n).is_file()]
        if not any(n in present for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return False
        out.mkdir(parents=True, exist_ok=True)
        for n in present:
            shutil.copyfile(self.path / n, out / n)
        return True


def _eos_ids(generation: dict[str, Any], config: Any) -> list[int]:
    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def build_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return build_without_weights(AutoModelForCausalLM, config, dtype, "a causal LM")


def load_hf(
    path: Path,
    dtype: str = "fp32",
    max_seq_len: int | None = None,
    max_batch_size: int = 1,
    dequantize: bool = False,
) -> CapturedModel:
    """Capture the causal LM at ``path`` (checkpoint directory or .gguf) for generation."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1 (got {max_batch_size})")
    ckpt = HFCheckpoint(path, dequantize)
    config = ckpt.config
    if ckpt.gguf is None and is_encoder(config):  # BERT-style: a generic program (see hf_encoder)
        return load_hf_encoder(path, config, ckpt.tensors, DTYPES[dtype], max_seq_len, max_batch_size)
    text = config.get_text_config(decoder=True)
    limit = _model_limit(text)
    seq = max_seq_len or min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if seq < 2:
        raise UsageError(f"--max-seq-len must be at least 2 (got {seq})")
    if limit is not None and seq > limit:
        raise UsageError(f"--max-seq-len {seq} exceeds the model's limit of {limit} positions")
    window = _sliding_window(text)
    if window is not None and seq > window:
        raise UnsupportedModelError(
            "sliding-window attention beyond the window is not supported: "
            f"compile with --max-seq-len <= {window}"
        )
    torch_dtype = DTYPES[dtype]
    model = build_model(config, torch_dtype)
    tensors = prepare_experts(model, ckpt.tensors)  # mixture of experts: see hf_experts
    wrapper: CausalLMWithStaticCache | IndependentRowsLM
    if max_batch_size > 1:  # independent rows for continuous batching (see hf_rows)
        wrapper = IndependentRowsLM(model, max_batch_size, seq).eval()
        program = export_rows(wrapper, str(path), _export_module)
    else:
        wrapper = CausalLMWithStaticCache(model, max_batch_size, seq).eval()
        program = export_static_cache(wrapper, max_batch_size, seq, str(path))
    reader = CheckpointReader(tensors, model, torch_dtype)
    reader.buffers.update({f"{CACHE_PREFIX}{k}": v for k, v in wrapper.kv_cache.named_buffers()})
    generation = ckpt.generation_defaults()
    info = LanguageModelInfo(
        vocab_size=int(text.vocab_size),
        max_seq_len=seq,
        max_batch_size=max_batch_size,
        eos_token_ids=_eos_ids(generation, text),
        bos_token_id=generation.get("bos_token_id", getattr(text, "bos_token_id", None)),
        pad_token_id=generation.get("pad_token_id", getattr(text, "pad_token_id", None)),
        generation={
            k: generation[k] for k in ("do_sample", "temperature", "top_k", "top_p") if k in generation
        },
        model_type=str(getattr(config, "model_type", "")),
        independent_rows=max_batch_size > 1,
        save_tokenizer=ckpt.save_tokenizer,
    )
    zero = {f"{CACHE_PREFIX}{kind}_{i}" for i in range(wrapper.layers) for kind in ("key", "value")}
    captured = captured_program(
        program,
        path.name,
        reader.read,
        read_slice=reader.read_slice,
        zero_state=zero,
        lm=info,
    )
    for node, name in captured.state_names().items():
        if name not in zero:
            reader.check(name, tuple(int(d) for d in node.meta["val"].shape))
    if ckpt.gguf is not None:  # quantized tensors: kept packed where a kernel reads their format
        names = set(captured.state_names().values()) - zero
        captured.packed = {n: f for n in sorted(names) if (f := reader.packed_format(n)) is not None}
        captured.read_packed = reader.read_packed
        for name in sorted(names):  # the file's names -> the stored tensors' names, as packed is keyed
            key = reader.source_key(name)
            if key in ckpt.gguf.unpacked:
                captured.unpacked[name] = ckpt.gguf.unpacked[key]
    return captured


def _export_module(module: nn.Module, args: tuple[Any, ...], dynamic: Any, source: str) -> Any:
    return export_module(module, args, dynamic, source, strict=False)


def export_static_cache(
    wrapper: nn.Module, batch: int, seq: int, source: str
) -> torch.export.ExportedProgram:
    """Capture ``wrapper`` with a dynamic sequence length of 1 .. ``seq - 1`` tokens."""
    ids = torch.zeros(batch, 2, dtype=torch.long)
    pos = torch.arange(2)
    length = torch.export.Dim("seq_len", min=1, max=seq - 1)
    return export_module(wrapper, (ids, pos), ({1: length}, {0: length}), source, strict=False)
