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

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel, LanguageModelInfo, captured_program
from tpcompile.frontend.hf_encoder import is_encoder, load_hf_encoder
from tpcompile.frontend.hf_experts import prepare_experts
from tpcompile.frontend.sources import TensorSource, read_slice

PREFIX = "hf."
CACHE_PREFIX = "kv_cache."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_SEQ_LEN = 4096


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with meta parameters but real buffers (rotary tables are computed in __init__)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Cache(nn.Module):
    """Per-layer key/value buffers ``[B, Hkv, max_seq_len, D]``."""

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        super().__init__()
        for i in range(layers):
            self.register_buffer(f"key_{i}", torch.empty(shape, dtype=dtype))
            self.register_buffer(f"value_{i}", torch.empty(shape, dtype=dtype))


class CausalLMWithStaticCache(nn.Module):
    """``forward(input_ids, cache_position) -> logits`` with the KV cache written in place."""

    def __init__(self, model: nn.Module, batch: int, max_seq_len: int) -> None:
        super().__init__()
        self.hf = model
        text = model.config.get_text_config(decoder=True)  # type: ignore[union-attr,operator]
        self.text_config = text
        self.max_seq_len = max_seq_len
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.layers = text.num_hidden_layers
        dtype = next(model.parameters()).dtype
        self.kv_cache = _Cache(self.layers, (batch, kv_heads, max_seq_len, head_dim), dtype)

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

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gguf: Any = None
        if path.is_file() and path.suffix == ".gguf":
            from tpcompile.frontend.gguf_source import GGUFCheckpoint

            self.gguf = GGUFCheckpoint(path)
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
            raise UnsupportedModelError(
                f"cannot read {path}/config.json: {str(err).splitlines()[0]}"
            ) from None
        self.tensors = SafetensorsCheckpoint(path)

    def generation_defaults(self) -> dict[str, Any]:
        if self.gguf is not None:
            return dict(self.gguf.generation_defaults())
        path = self.path / "generation_config.json"
        if not path.is_file():
            return {}
        import json

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

    with _parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(
                f"model type {getattr(config, 'model_type', '?')!r} is not a causal LM that transformers "
                f"can build: {str(err).splitlines()[0]}"
            ) from None
    _unbacked_cpu_parameters(model)
    return model.eval()


def load_hf(
    path: Path, dtype: str = "fp32", max_seq_len: int | None = None, max_batch_size: int = 1
) -> CapturedModel:
    """Capture the causal LM at ``path`` (checkpoint directory or .gguf) for generation."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    if max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1 (got {max_batch_size})")
    ckpt = HFCheckpoint(path)
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
    wrapper = CausalLMWithStaticCache(model, max_batch_size, seq).eval()
    program = _export(wrapper, max_batch_size, seq, str(path))
    reader = _CheckpointReader(tensors, model, torch_dtype)
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
    return captured


def _export(wrapper: nn.Module, batch: int, seq: int, source: str) -> torch.export.ExportedProgram:
    ids = torch.zeros(batch, 2, dtype=torch.long)
    pos = torch.arange(2)
    length = torch.export.Dim("seq_len", min=1, max=seq - 1)
    try:
        with torch.no_grad():
            program = torch.export.export(
                wrapper,
                (ids, pos),
                dynamic_shapes=({1: length}, {0: length}),
                strict=False,
            )
    except Exception as err:  # torch.export raises many types; report the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(f"torch.export could not capture {source}: {first}") from err
    return program


def _unbacked_cpu_parameters(model: nn.Module) -> None:
    """Swap meta parameters for uninitialised CPU tensors (ties kept): tracing then sees one device, and
    ``torch.empty`` reserves address space without touching pages, so no weight memory is used."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False)
            module._parameters[name] = replaced[id(param)]


def _renamed_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model key -> checkpoint key: transformers renames some checkpoint keys when it loads them
    (GPT-NeoX's ``embed_out`` is the model's ``lm_head``); plain renamings are applied, nothing else."""
    renamings: list[Any] = []
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        mapping = get_model_conversion_mapping(model)  # type: ignore[arg-type]
        renamings = [t for t in mapping if type(t) is WeightRenaming]
    except (ImportError, AttributeError, TypeError):  # an older transformers: no renamings
        return {k: k for k in keys}
    out: dict[str, str] = {}
    for key in keys:
        out.setdefault(apply_renamings(key, renamings) if renamings else key, key)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for key in keys:  # a task model's checkpoint read by its base model: bert.encoder... -> encoder...
        if prefix != "." and key.startswith(prefix):
            out.setdefault(key.removeprefix(prefix), key)
    return out


class _CheckpointReader:
    """Stored tensors of the wrapper by fully-qualified name -> checkpoint tensors (ties resolved)."""

    def __init__(self, source: TensorSource, model: nn.Module, dtype: torch.dtype) -> None:
        self.source, self.model, self.dtype = source, model, dtype
        self.renamed = _renamed_keys(model, source.names())
        self.available = set(self.renamed)
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.aliases = {name: names for names in groups.values() for name in names}
        self.buffers = dict(model.named_buffers(remove_duplicate=False))

    def _resolve(self, name: str) -> str | None:
        local = name.removeprefix(PREFIX)
        for candidate in self.aliases.get(local, [local]):
            if candidate in self.available:
                return self.renamed[candidate]
        return None

    def _computed(self, local: str) -> torch.Tensor:
        buf = self.buffers.get(local)
        if local.startswith(CACHE_PREFIX) and buf is not None:
            return torch.zeros_like(buf)
        if buf is None or buf.is_meta:
            raise UnsupportedModelError(
                f"the checkpoint has no tensor {local} (and the model does not compute it)"
            )
        return buf.detach()

    def check(self, name: str, expected: tuple[int, ...]) -> None:
        """Fail before compiling when the checkpoint lacks a tensor or disagrees with the config."""
        key = self._resolve(name)
        if key is None:
            self._computed(name.removeprefix(PREFIX))
            return
        got = tuple(self.source.shape(key))
        if got != expected:
            raise UnsupportedModelError(
                f"checkpoint tensor {key} has shape {list(got)} but the config implies {list(expected)}"
            )

    def read(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            return self._computed(name.removeprefix(PREFIX))
        return self.source.read(key).to(self.dtype)

    def read_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            return self._computed(name.removeprefix(PREFIX)).narrow(dim, start, length)
        return read_slice(self.source, key, dim, start, length).to(self.dtype)
