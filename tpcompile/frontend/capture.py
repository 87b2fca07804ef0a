"""Capture a model as an ExportedProgram, from a ``torch.export.save`` file, a Python factory
(``pkg.module:build`` returning ``(module, example_args[, dynamic_shapes])``) or, only with
``--trust-pickle``, a pickled ``(module, example_args)``.

Invariant: a ``CapturedModel`` has an ATen graph whose placeholders are the stored tensors (named by their
fully-qualified names) followed by the user inputs, and a way to read every stored tensor.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.runtime.errors import first_line
from tpcompile.runtime.format.quant_section import QuantFormat


@dataclass
class LanguageModelInfo:
    """What a causal LM artifact records for generation (see the manifest's ``extra.lm``)."""

    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    generation: dict[str, Any]
    model_type: str
    independent_rows: bool  # the program serves unrelated rows (frontend/hf_rows.py)
    save_tokenizer: Callable[[Path], bool]  # writes the tokenizer into a directory; False if there is none


@dataclass
class CapturedModel:
    program: ExportedProgram
    source: str
    read_tensor: Callable[[str], torch.Tensor]
    # read_slice(name, dim, start, length): a slice without reading the whole tensor, when the source can
    read_slice: Callable[[str, int, int, int], torch.Tensor] | None = None
    zero_state: set[str] = field(default_factory=set)  # buffers the runtime creates as zeros (KV caches)
    lm: LanguageModelInfo | None = None
    # stored tensors the source can read packed (kept quantized in the shards), and how to read them:
    # read_packed(name, dim, start, length) -> uint8 blocks of that slice (runtime/format/quant_section.py)
    packed: dict[str, QuantFormat] = field(default_factory=dict)
    read_packed: Callable[[str, int, int, int], torch.Tensor] | None = None
    # quantized in the source, but stored as floats (no kernel for the format): stored tensor's name (as in
    # packed) -> (format, its bytes in the source)
    unpacked: dict[str, tuple[str, int]] = field(default_factory=dict)
    # how the user stores the packed weights as floats instead (named when their blocks cannot be split)
    float_fix: str = "--dequantize"
    warnings: list[str] = field(default_factory=list)  # for the manifest (e.g. weights left unquantized)

    @property
    def gm(self) -> fx.GraphModule:
        return self.program.graph_module

    def state_names(self) -> dict[fx.Node, str]:
        """Placeholder node -> fully-qualified name of the stored tensor it is."""
        by_name = {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}
        names: dict[fx.Node, str] = {}
        for spec in self.program.graph_signature.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                assert spec.target is not None
                names[by_name[spec.arg.name]] = spec.target
            elif spec.kind != InputKind.USER_INPUT:
                raise UnsupportedModelError(
                    f"inputs of kind {spec.kind.name} are not supported ({spec.arg.name})"
                )
        return names

    def user_inputs(self) -> list[fx.Node]:
        by_name = {n.name: n for n in self.gm.graph.nodes if n.op == "placeholder"}
        return [
            by_name[s.arg.name]
            for s in self.program.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT
        ]


def _state_reader(ep: ExportedProgram) -> Callable[[str], torch.Tensor]:
    def read(name: str) -> torch.Tensor:
        if name in ep.state_dict:
            return ep.state_dict[name].detach()
        value = ep.constants.get(name)
        if isinstance(value, torch.Tensor):
            return value.detach()
        raise UnsupportedModelError(f"stored tensor {name} has no data in the exported program")

    return read


def captured_program(
    ep: ExportedProgram,
    source: str,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
    **extra: Any,
) -> CapturedModel:
    """Check that ``ep`` is a flat ATen graph, merge tied parameters, and wrap it."""
    for node in ep.graph.nodes:
        if node.op == "get_attr" or node.op == "call_module":
            raise UnsupportedModelError(
                f"control flow or submodule calls are not supported ({node.op} {node.target} in {source})"
            )
    merge_tied_parameters(ep)
    return CapturedModel(ep, source, read_tensor or _state_reader(ep), **extra)


def merge_tied_parameters(ep: ExportedProgram) -> None:
    """Tied parameters (one tensor under several names, e.g. embedding and lm_head) are exported as one
    placeholder per name; keep the first, so that the compiler stores and shards the tensor once."""
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    first: dict[int, fx.Node] = {}
    drop: list[Any] = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.PARAMETER or spec.target not in ep.state_dict:
            continue
        key = id(ep.state_dict[spec.target])
        node = by_name[spec.arg.name]
        if key in first:
            node.replace_all_uses_with(first[key])
            ep.graph.erase_node(node)
            drop.append(spec)
        else:
            first[key] = node
    for spec in drop:
        ep.graph_signature.input_specs.remove(spec)
        del ep.state_dict[spec.target]
    if drop:
        ep.graph_module.recompile()


def export_module(
    module: torch.nn.Module, args: tuple[Any, ...], dynamic: Any, source: str, strict: bool = True
) -> ExportedProgram:
    """``torch.export.export`` of ``module`` in eval mode; any failure is one ``UnsupportedModelError``."""
    try:
        with torch.no_grad():
            return torch.export.export(module.eval(), tuple(args), dynamic_shapes=dynamic, strict=strict)
    except Exception as err:  # torch.export raises many types; report the first line
        raise UnsupportedModelError(f"torch.export could not capture {source}: {first_line(err)}") from err


def capture_factory(spec: str) -> CapturedModel:
    """Call ``pkg.module:function``; capture the ``(module, example_args[, dynamic_shapes])`` it returns."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot import factory {spec}: {err}") from None
    result = factory()
    if isinstance(result, dict):
        result = (result["model"], result["args"], result.get("dynamic_shapes"))
    if (
        not isinstance(result, tuple)
        or len(result) not in (2, 3)
        or not isinstance(result[0], torch.nn.Module)
    ):
        raise UsageError(f"factory {spec} must return (nn.Module, example_args[, dynamic_shapes])")
    module, args = result[0], result[1]
    dynamic = result[2] if len(result) == 3 else None
    return captured_program(export_module(module, tuple(args), dynamic, spec), spec)


def capture_pickle(path: Path) -> CapturedModel:
    """Unpickle ``(module, example_args[, dynamic_shapes])`` (runs the file's code) and capture it."""
    obj = torch.load(path, weights_only=False, map_location="cpu")
    if isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], torch.nn.Module):
        dynamic = obj[2] if len(obj) == 3 else None
        return captured_program(export_module(obj[0], tuple(obj[1]), dynamic, str(path)), str(path))
    raise UsageError(
        f"{path} holds a {type(obj).__name__}; a pickled model must be (nn.Module, example_args), "
        "or export it with torch.export.save"
    )
