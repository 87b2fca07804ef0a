"""A causal LM's shape without its weights: captured from its config alone, for planning and prediction.

``tpcompile plan`` plans models nobody has downloaded (a Llama-3-70B-shaped config.json), so nothing here
reads a tensor: the model is built on the meta device (``hf_model.build_without_weights``) and captured
like ``hf.load_hf`` does, with ``layers`` decoder layers instead of the config's count, so that a deep
model is planned as its 1- and 2-layer versions (see ``cost/workload.Workload.extrapolated``).

Invariant: the captured model cannot read weights (``read_tensor`` raises); it is for planning only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel, LanguageModelInfo, captured_program
from tpcompile.frontend.hf import (
    DEFAULT_MAX_SEQ_LEN,
    CausalLMWithStaticCache,
    build_model,
    export_static_cache,
)
from tpcompile.frontend.hf_experts import prepare_experts
from tpcompile.frontend.hf_model import CACHE_PREFIX, DTYPES
from tpcompile.runtime.errors import first_line


class _NoWeights:
    """A tensor source without tensors: planning reads shapes only."""

    def names(self) -> list[str]:
        return []

    def shape(self, name: str) -> tuple[int, ...]:
        raise UnsupportedModelError(f"no weights when planning from a config ({name})")

    def read(self, name: str) -> torch.Tensor:
        raise UnsupportedModelError(f"no weights when planning from a config ({name})")


def read_config(spec: str) -> Any:
    """The text config of a checkpoint directory, a config.json file or a .gguf file."""
    path = Path(spec)
    if not path.exists():
        raise UsageError(
            f"model {spec} does not exist (expected a checkpoint directory, config.json or .gguf)"
        )
    if path.suffix == ".gguf":
        from tpcompile.frontend.gguf_source import GGUFCheckpoint

        return GGUFCheckpoint(path).config
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() or path.suffix != ".json":
        raise UsageError(f"{spec} is not a checkpoint directory, a config.json or a .gguf file")
    from transformers import AutoConfig, PretrainedConfig

    try:
        as_dict, _ = PretrainedConfig.get_config_dict(str(path))
        return AutoConfig.for_model(**as_dict)
    except Exception as err:  # transformers raises ValueError/KeyError/OSError for bad configs
        raise UnsupportedModelError(f"cannot read {path}: {first_line(err)}") from None


def text_layers(config: Any) -> int:
    return int(config.get_text_config(decoder=True).num_hidden_layers)


def capture_shape(
    config: Any, layers: int, dtype: str, max_seq_len: int | None, source: str
) -> CapturedModel:
    """``config``'s causal LM with ``layers`` decoder layers, captured for planning (no weights)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True)
    text.num_hidden_layers = layers
    for key in ("layer_types", "mlp_layer_types"):  # per-layer lists follow the layer count
        value = getattr(text, key, None)
        if isinstance(value, list):
            setattr(text, key, value[:layers])
    limit = getattr(text, "max_position_embeddings", None)
    seq = max_seq_len or min(int(limit or DEFAULT_MAX_SEQ_LEN), DEFAULT_MAX_SEQ_LEN)
    model = build_model(config, DTYPES[dtype])
    prepare_experts(model, _NoWeights())
    wrapper = CausalLMWithStaticCache(model, 1, seq).eval()
    program = export_static_cache(wrapper, 1, seq, source)
    info = LanguageModelInfo(
        vocab_size=int(text.vocab_size),
        max_seq_len=seq,
        max_batch_size=1,
        eos_token_ids=[],
        bos_token_id=None,
        pad_token_id=None,
        generation={},
        model_type=str(getattr(config, "model_type", "")),
        independent_rows=False,
        save_tokenizer=lambda _out: False,
    )
    zero = {f"{CACHE_PREFIX}{kind}_{i}" for i in range(layers) for kind in ("key", "value")}
    return captured_program(program, source, _NoWeights().read, zero_state=zero, lm=info)
