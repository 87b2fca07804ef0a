"""Hugging Face encoders (BERT-style checkpoints) captured as generic programs.

A checkpoint whose config names no causal-LM class (``BertForMaskedLM``, ``BertModel``, ...) is built as
its base model (``AutoModel``) without weights and captured as ``forward(input_ids [B, T], attention_mask
[B, T]) -> last_hidden_state [B, T, H]`` with a dynamic batch and sequence length. The artifact is generic:
``tprun OUT --inputs in.safetensors -o out.safetensors``. Weights stream from the checkpoint as for causal
LMs (a task model's checkpoint stores the base model under its prefix, ``bert.``); stored tensors the
captured program never reads (a pooler the checkpoint lacks) are dropped.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.graph_signature import InputKind

from tpcompile.errors import UnsupportedModelError
from tpcompile.frontend.capture import CapturedModel, captured_program, export_module
from tpcompile.frontend.hf_model import CheckpointReader, build_without_weights

MIN_SEQ = 2


def is_encoder(config: Any) -> bool:
    """True for a config transformers cannot build as a causal LM, or whose architectures are none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    model_type = getattr(config, "model_type", "")
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return bool(architectures) or hasattr(config, "hidden_size")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return bool(architectures) and not any(a in causal or a.endswith("ForCausalLM") for a in architectures)


class EncoderOutput(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state`` of a base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def drop_unused_state(ep: torch.export.ExportedProgram) -> None:
    """Remove parameters and buffers no node reads (a base model's pooler when only the hidden states are
    returned), so that the checkpoint need not have them."""
    ep.graph.eliminate_dead_code()  # the pooler's ops: their result is not returned
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    kinds = (InputKind.PARAMETER, InputKind.BUFFER)
    unused = [s for s in ep.graph_signature.input_specs if s.kind in kinds and not by_name[s.arg.name].users]
    for spec in unused:
        ep.graph.erase_node(by_name[spec.arg.name])
        ep.graph_signature.input_specs.remove(spec)
        if spec.target in ep.state_dict:
            del ep.state_dict[spec.target]
    ep.graph_module.recompile()


def load_hf_encoder(
    path: Path, config: Any, tensors: Any, dtype: torch.dtype, max_seq_len: int | None, batch: int
) -> CapturedModel:
    from transformers import AutoModel

    model = build_without_weights(AutoModel, config, dtype, "a causal LM or an encoder")
    if "attention_mask" not in inspect.signature(model.forward).parameters:
        raise UnsupportedModelError(f"{type(model).__name__} takes no attention_mask; not an encoder")
    wrapper = EncoderOutput(model.eval()).eval()
    limit = int(getattr(config, "max_position_embeddings", 0) or 512)
    seq = min(max_seq_len or limit, limit)
    ids = torch.zeros(batch, MIN_SEQ + 1, dtype=torch.long)
    mask = torch.ones(batch, MIN_SEQ + 1, dtype=torch.long)
    length = torch.export.Dim("seq_len", min=MIN_SEQ, max=seq)
    program = export_module(wrapper, (ids, mask), ({1: length}, {1: length}), str(path), strict=False)
    drop_unused_state(program)
    reader = CheckpointReader(tensors, model, dtype)
    captured = captured_program(program, path.name, reader.read, read_slice=reader.read_slice)
    for node, name in captured.state_names().items():
        reader.check(name, tuple(int(d) for d in node.meta["val"].shape))
    return captured
