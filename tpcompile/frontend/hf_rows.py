"""Causal LMs captured for independent rows: the program of an artifact compiled with ``--max-batch-size``
above 1, which serves that many unrelated sequences at once (continuous batching).

The captured program is ``forward(input_ids [B, T], position_ids [B, T], first_slot [1]) -> logits [B, T,
V]`` with a dynamic ``B`` in ``[1, max_batch_size]`` and a dynamic ``T``. The KV cache buffers hold
``max_batch_size`` rows (*slots*); a call works on the contiguous slots ``first_slot .. first_slot + B``
(``narrow`` on the batch dim: a view, no copy), writes row ``b``'s keys and values at that row's own
positions (``scatter_`` along the sequence dim) and masks per row: query ``t`` of row ``b`` attends the keys
``0 .. position_ids[b, t]`` of its slot.

Invariants:
- a slot's entries past a query's position are never read, so a slot reused by a new sequence needs no
  clearing: the new prompt's prefill writes positions ``0 .. P-1`` before any query reads them;
- rows are independent: a row's logits depend only on its own slot and inputs (up to floating-point
  summation order), so a row being decoded next to others gets the tokens it would get alone;
- the sharding is the one of the single-sequence program: the per-row write index is broadcast over the KV
  heads and split like them (``passes/ops/indexing.py``), so the cache stays split by heads.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from torch import nn

from tpcompile.runtime.format.lm import ROW_INPUT_NAMES


class KVCacheBuffers(nn.Module):
    """Per-layer key/value buffers ``[B, Hkv, max_seq_len, D]``, named ``key_<i>`` / ``value_<i>``."""

    def __init__(self, layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        super().__init__()
        for i in range(layers):
            self.register_buffer(f"key_{i}", torch.empty(shape, dtype=dtype))
            self.register_buffer(f"value_{i}", torch.empty(shape, dtype=dtype))

    def pair(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers of ``layer``."""
        return self.get_buffer(f"key_{layer}"), self.get_buffer(f"value_{layer}")


def cache_shape(text_config: Any, batch: int, max_seq_len: int) -> tuple[int, int, int, int]:
    """``(batch, kv_heads, max_seq_len, head_dim)`` of one layer's key (or value) buffer."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return (batch, kv_heads, max_seq_len, head_dim)


def _row_layer_class() -> type:
    """transformers' cache layer protocol, implemented for per-row writes (imported lazily: transformers
    is only needed when a language model is compiled)."""
    from transformers.cache_utils import CacheLayerMixin

    class RowCacheLayer(CacheLayerMixin):
        """One layer's slots ``[B, Hkv, S, D]`` (views of the buffers); ``update`` scatters each row's new
        keys and values at that row's positions and returns the whole slots."""

        is_compileable = True
        is_sliding = False

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values  # what transformers reads
            self.slots = (keys, values)
            self.index = index  # [B, 1, T, 1]
            self.is_initialized = True

        def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
            """Nothing to allocate: the slots are the wrapper's buffers."""

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.slots
            heads, dim = key_states.shape[1], key_states.shape[3]
            keys.scatter_(2, self.index.expand(-1, heads, -1, dim), key_states)
            heads, dim = value_states.shape[1], value_states.shape[3]
            values.scatter_(2, self.index.expand(-1, heads, -1, dim), value_states)
            return keys, values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return int(self.slots[0].shape[2]), 0

        def get_seq_length(self) -> int:
            return 0  # positions are per row; the model is always given position_ids

        def get_max_length(self) -> int:
            return int(self.slots[0].shape[2])

        def get_max_cache_shape(self) -> int:
            return int(self.slots[0].shape[2])

    return RowCacheLayer


class IndependentRowsLM(nn.Module):
    """``forward(input_ids, position_ids, first_slot) -> logits`` over independent rows (see the module
    docstring); the KV cache is written in place."""

    def __init__(self, model: nn.Module, max_batch_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.hf = model
        text = model.config.get_text_config(decoder=True)  # type: ignore[union-attr,operator]
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.layers = text.num_hidden_layers
        self.additive_mask = getattr(text, "_attn_implementation", "sdpa") == "eager"
        dtype = next(model.parameters()).dtype
        self.kv_cache = KVCacheBuffers(self.layers, cache_shape(text, max_batch_size, max_seq_len), dtype)
        self._layer = _row_layer_class()

    def _mask(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, 1, T, S]``: key ``j`` is open to query ``(b, t)`` when ``j <= position_ids[b, t]``."""
        keys = torch.arange(self.max_seq_len, device=position_ids.device)
        mask = keys[None, None, None, :] <= position_ids[:, None, :, None]
        if not self.additive_mask:
            return mask
        closed = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), closed)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, first_slot: torch.Tensor
    ) -> torch.Tensor:
        from transformers.cache_utils import Cache

        rows = input_ids.shape[0]
        start = cast(int, first_slot.item())  # an unbacked int while exporting
        torch._check(start >= 0)
        torch._check(start + rows <= self.max_batch_size)
        index = position_ids[:, None, :, None]
        layers = []
        for i in range(self.layers):
            keys, values = self.kv_cache.pair(i)
            layers.append(self._layer(keys.narrow(0, start, rows), values.narrow(0, start, rows), index))
        dtype = self.kv_cache.pair(0)[0].dtype
        out = self.hf(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self._mask(position_ids, dtype),
            past_key_values=Cache(layers=layers),
            use_cache=True,
        )
        return out.logits


def export_rows(
    wrapper: IndependentRowsLM, source: str, export: Any
) -> torch.export.ExportedProgram:
    """Capture ``wrapper`` with a dynamic batch ``[1, max_batch_size]`` and sequence length, through
    ``export(module, args, dynamic_shapes, source)`` (the frontend's ``export_module``)."""
    names = tuple(inspect.signature(wrapper.forward).parameters)
    assert names == ROW_INPUT_NAMES, names  # the runtime finds the inputs by these names
    batch, seq = wrapper.max_batch_size, wrapper.max_seq_len
    ids = torch.zeros(2, 2, dtype=torch.long)
    positions = torch.arange(2).expand(2, 2).contiguous()
    rows = torch.export.Dim("batch", min=1, max=batch)
    length = torch.export.Dim("seq_len", min=1, max=seq - 1)
    dynamic = ({0: rows, 1: length}, {0: rows, 1: length}, None)
    # Sizes are traced as "at least 2" by default, which would bound first_slot by max_batch_size - 2 (from
    # first_slot + rows <= max_batch_size): trace them size-obliviously (>= 0) so every slot stays reachable.
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        program: torch.export.ExportedProgram = export(
            wrapper, (ids, positions, torch.zeros(1, dtype=torch.long)), dynamic, source
        )
    return program
