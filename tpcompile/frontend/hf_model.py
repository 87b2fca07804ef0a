"""Building a transformers model without its weights, and reading its stored tensors from a checkpoint.

Shared by the causal-LM frontend (``hf.py``) and the encoder frontend (``hf_encoder.py``).

Invariant: a model built under ``parameters_on_meta`` and passed through ``unbacked_cpu_parameters`` holds no
weight memory (uninitialised CPU tensors reserve address space only; ties are kept), and
``CheckpointReader`` maps every stored tensor name of a captured wrapper to exactly one checkpoint tensor
(through tied aliases and transformers' plain renamings), to a computed buffer of the model, or to a KV
cache buffer (zeros); anything else is an ``UnsupportedModelError`` before compiling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tpcompile.errors import UnsupportedModelError
from tpcompile.frontend.sources import TensorSource, read_slice
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.format.quant_section import QuantFormat

#: Stored tensors of a wrapped model are named ``hf.<model name>``; KV caches ``kv_cache.<key|value>_<i>``.
PREFIX = "hf."
CACHE_PREFIX = "kv_cache."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
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


def unbacked_cpu_parameters(model: nn.Module) -> None:
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


def build_without_weights(auto_class: Any, config: Any, dtype: torch.dtype, what: str) -> nn.Module:
    """``auto_class.from_config(config)`` with no weight memory (see the module invariant), in eval mode;
    ``what`` names the kind of model in the error when transformers cannot build one."""
    with parameters_on_meta():
        try:
            model = auto_class.from_config(config, dtype=dtype)
        except ValueError as err:
            raise UnsupportedModelError(
                f"model type {getattr(config, 'model_type', '?')!r} is not {what} that transformers can "
                f"build: {first_line(err)}"
            ) from None
    unbacked_cpu_parameters(model)
    return model.eval()


def renamed_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
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


class CheckpointReader:
    """Stored tensors of the wrapper by fully-qualified name -> checkpoint tensors (ties resolved)."""

    def __init__(self, source: TensorSource, model: nn.Module, dtype: torch.dtype) -> None:
        self.source, self.model, self.dtype = source, model, dtype
        self.renamed = renamed_keys(model, source.names())
        self.available = set(self.renamed)
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.aliases = {name: names for names in groups.values() for name in names}
        self.buffers = dict(model.named_buffers(remove_duplicate=False))

    def source_key(self, name: str) -> str | None:
        """The checkpoint's name of the stored tensor ``name`` (ties resolved), or None if it has none."""
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
        key = self.source_key(name)
        if key is None:
            self._computed(name.removeprefix(PREFIX))
            return
        got = tuple(self.source.shape(key))
        if got != expected:
            raise UnsupportedModelError(
                f"checkpoint tensor {key} has shape {list(got)} but the config implies {list(expected)}"
            )

    def read(self, name: str) -> torch.Tensor:
        key = self.source_key(name)
        if key is None:
            return self._computed(name.removeprefix(PREFIX))
        return self.source.read(key).to(self.dtype)

    def packed_format(self, name: str) -> QuantFormat | None:
        """The block format the source can read ``name`` packed in (a GGUF file), or None."""
        key = self.source_key(name)
        formats = getattr(self.source, "packed_format", None)
        return None if key is None or formats is None else formats(key)

    def read_packed(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        key = self.source_key(name)
        assert key is not None
        return self.source.read_packed(key, dim, start, length)  # type: ignore[attr-defined]

    def read_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        key = self.source_key(name)
        if key is None:
            return self._computed(name.removeprefix(PREFIX)).narrow(dim, start, length)
        return read_slice(self.source, key, dim, start, length).to(self.dtype)
