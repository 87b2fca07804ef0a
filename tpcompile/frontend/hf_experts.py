"""Mixture-of-experts layers of transformers 5.x, captured in a form the sharding passes can split.

transformers stores the experts of one layer as stacked 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) behind a pluggable forward (``@use_experts_implementation``). Its implementations
either loop over the experts hit (data-dependent shapes: torch.export cannot capture them) or call a custom
grouped-matmul op. Here every experts module of that protocol gets:

- a *dense* forward, exactly equal to the sparse one: every expert runs on every token and its output is
  weighted by a routing matrix ``[tokens, E]`` that holds the top-k weights and exact zeros elsewhere
  (``x * 0 == 0`` and adding zeros is exact). The products are batched over the expert dim, so expert
  parallelism is a shard of that dim and the weighted sum over it is a partial sum (one all-reduce);
- its fused ``gate_up_proj`` stored as two parameters ``gate_proj`` / ``up_proj`` (each ``[E, I, H]``), so
  that the intermediate dim can be split like an MLP's (a chunk of a column-split fused matrix would mix
  gate and up rows).

Checkpoints keep per-expert tensors (``experts.0.w1.weight`` ...): ``ConvertedSource`` applies
transformers' own conversion mapping (renames, stacking, concatenation) and the gate/up split above.
Detection uses the attributes the transformers decorator sets (``has_gate``, ``is_concatenated``...),
never module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tpcompile.errors import UnsupportedModelError
from tpcompile.frontend.sources import TensorSource, read_slice

IMPLEMENTATION = "tpcompile_dense"


def dense_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``sum_e routing[:, e] * down_e(act(gate_e(x)) * up_e(x))`` over all experts, batched over e."""
    m: Any = self
    weights = top_k_weights.to(hidden_states.dtype)
    # [N, k, E] one-hot times the weight, summed over k: top-k indices are distinct, so this is exact
    one_hot = nn.functional.one_hot(top_k_index, int(m.num_experts)).to(weights.dtype)
    routing = (one_hot * weights.unsqueeze(-1)).sum(1)  # [N, E], zero where a token is not routed
    gate = torch.matmul(hidden_states, m.gate_proj.transpose(1, 2))  # [E, N, I]
    up = torch.matmul(hidden_states, m.up_proj.transpose(1, 2))
    out = torch.matmul(m.act_fn(gate) * up, m.down_proj.transpose(1, 2))  # [E, N, H]
    return (out * routing.t().unsqueeze(-1)).sum(0).to(hidden_states.dtype)


@dataclass(frozen=True)
class SplitTensor:
    """A stored tensor that is a slice of a fused checkpoint tensor (after conversion)."""

    fused: str
    dim: int
    start: int
    length: int


def _is_experts_module(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("has_gate", "_is_expert_parallel", "down_proj"))


def _check_supported(module: Any, path: str) -> None:
    from transformers.integrations.moe import _default_apply_gate as default_gate

    unsupported = [
        what
        for what, bad in (
            ("experts without a gate projection", not module.has_gate),
            ("interleaved gate/up weights", not getattr(module, "is_concatenated", True)),
            ("transposed expert weights", getattr(module, "is_transposed", False)),
            ("expert biases", getattr(module, "has_bias", False)),
            ("a norm after each expert", getattr(module, "has_post_expert_norm", False)),
            ("a custom gating function", getattr(type(module), "_apply_gate", None) is not default_gate),
        )
        if bad
    ]
    if unsupported:
        raise UnsupportedModelError(f"mixture-of-experts layer {path} uses {unsupported[0]} (not supported)")


def _split_gate_up(module: Any, path: str) -> dict[str, SplitTensor]:
    fused = module.gate_up_proj
    experts, rows, hidden = fused.shape
    inner = rows // 2
    del module.gate_up_proj
    splits: dict[str, SplitTensor] = {}
    for i, name in enumerate(("gate_proj", "up_proj")):
        param = nn.Parameter(torch.empty(experts, inner, hidden, dtype=fused.dtype), requires_grad=False)
        module.register_parameter(name, param)
        splits[f"{path}.{name}"] = SplitTensor(f"{path}.gate_up_proj", 1, i * inner, inner)
    return splits


def prepare_experts(model: nn.Module, source: TensorSource) -> TensorSource:
    """Give every experts module of ``model`` the dense forward and split gate/up parameters; return the
    checkpoint source seen through transformers' conversion mapping (``source`` itself for dense models)."""
    modules = [(path, m) for path, m in model.named_modules() if _is_experts_module(m)]
    if not modules:
        return source
    for path, module in modules:
        _check_supported(module, path)
    converted = ConvertedSource(source, model)  # before the split: the mapping targets gate_up_proj
    for path, module in modules:
        converted.splits.update(_split_gate_up(module, path))
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, dense_experts_forward)
    try:
        model.set_experts_implementation(IMPLEMENTATION)  # type: ignore[operator]
    except (ValueError, AttributeError, RuntimeError) as err:
        raise UnsupportedModelError(f"cannot select the dense experts forward: {err}") from None
    for path, module in modules:
        if module.config._experts_implementation != IMPLEMENTATION:
            raise UnsupportedModelError(f"mixture-of-experts layer {path} ignores the experts implementation")
    return converted


class ConvertedSource:
    """Checkpoint tensors under the model's parameter names: transformers' renames and weight converters
    (stack per-expert tensors, concatenate gate and up) applied when a tensor is read."""

    def __init__(self, source: TensorSource, model: Any) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.source, self.model = source, model
        self.splits: dict[str, SplitTensor] = {}
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        expected = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.plain: dict[str, str] = {}
        self.converted: dict[str, tuple[Any, dict[str, list[str]]]] = {}
        for key in sorted(source.names(), key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if target not in expected and key in expected:
                target, pattern = key, None
            if pattern is None:
                self.plain.setdefault(target, key)
                continue
            converter, groups = self.converted.setdefault(target, (by_pattern[pattern], {}))
            groups.setdefault(pattern, []).append(key)

    def names(self) -> list[str]:
        fused = {s.fused for s in self.splits.values()}
        return sorted((set(self.plain) | set(self.converted) | set(self.splits)) - fused)

    def _convert(self, target: str, load: Any) -> torch.Tensor:
        converter, groups = self.converted[target]
        tensors: dict[str, Any] = {p: [load(k) for k in keys] for p, keys in groups.items()}
        for op in converter.operations:
            tensors = op.convert(
                tensors,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=target,
                model=self.model,
                config=getattr(self.model, "config", None),
            )
        if len(tensors) != 1:
            raise UnsupportedModelError(f"checkpoint conversion of {target} yields {len(tensors)} tensors")
        (value,) = tensors.values()
        return value[0] if isinstance(value, list) else value

    def shape(self, name: str) -> tuple[int, ...]:
        split = self.splits.get(name)
        if split is not None:
            shape = list(self.shape(split.fused))
            shape[split.dim] = split.length
            return tuple(shape)
        if name in self.plain:
            return tuple(self.source.shape(self.plain[name]))
        meta = self._convert(name, lambda k: torch.empty(self.source.shape(k), device="meta"))
        return tuple(meta.shape)

    def read(self, name: str) -> torch.Tensor:
        split = self.splits.get(name)
        if split is not None:
            return self.read(split.fused).narrow(split.dim, split.start, split.length).contiguous()
        if name in self.plain:
            return self.source.read(self.plain[name])
        return self._convert(name, self.source.read)

    def read_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        if name in self.plain:
            return read_slice(self.source, self.plain[name], dim, start, length)
        return self.read(name).narrow(dim, start, length).contiguous()
