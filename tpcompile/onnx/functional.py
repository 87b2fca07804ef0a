"""A rank's saved program as a graph ONNX can express: stored tensors as attributes, the KV cache explicit.

ONNX has no mutable state, and the exporter drops buffer mutations, so every buffer the runtime creates as
zeros (``zero_state``: the KV caches) becomes an extra input, each in-place write to it (``index_copy_``,
``index_put_``, ``copy_``...) becomes its out-of-place form, and the buffer's last value becomes an extra
output. Invariant: the module returns the program's outputs followed by one new value per state tensor, in
``state`` order, and computes the same values as the program with the state held in buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from tpcompile.artifact.program import input_signature
from tpcompile.errors import UnsupportedModelError


@dataclass
class StatefulModule:
    """The rank program as a plain module: ``forward(*user_inputs, *state) -> (*outputs, *new_state)``."""

    module: fx.GraphModule
    examples: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[Any, ...]
    user_inputs: list[str]
    state: list[str]  # fully-qualified buffer names, in input (and output) order
    n_outputs: int
    stored: set[str]  # tensors whose bytes are in the rank's weights file (uninitialised here)


def _out_of_place(target: Any) -> Any:
    """``aten.index_copy_.default`` -> ``aten.index_copy.default`` (None when there is no such overload)."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _empty_like(value: torch.Tensor) -> torch.Tensor:
    # CPU, uninitialised: export needs real devices (the graph's factories make CPU tensors), and the values
    # are never read: the ONNX initializers are pointed at the rank's safetensors file afterwards.
    empty = torch.empty(value.shape, dtype=value.dtype)
    return torch.nn.Parameter(empty, requires_grad=False) if isinstance(value, torch.nn.Parameter) else empty


def stateful_module(program: ExportedProgram, zero_state: set[str]) -> StatefulModule:
    """Rebuild ``program`` (a rank's ``program.pt2``) with its ``zero_state`` buffers as inputs/outputs."""
    sig = program.graph_signature
    targets = {s.arg.name: s.target for s in sig.input_specs if s.kind != InputKind.USER_INPUT}
    kinds = {s.arg.name: s.kind for s in sig.input_specs}
    tensors = {**dict(program.named_parameters()), **dict(program.named_buffers()), **program.constants}
    root: dict[str, Any] = {}
    stored: set[str] = set()
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    user_nodes: list[fx.Node] = []
    state_nodes: dict[str, fx.Node] = {}
    current: dict[str, Any] = {}  # state name -> its latest value in the new graph
    alias: dict[fx.Node, str] = {}  # new-graph node -> the state it currently stands for
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        if kinds[node.name] == InputKind.USER_INPUT:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            user_nodes.append(node)
    for node in placeholders:
        if kinds[node.name] == InputKind.USER_INPUT:
            continue
        target = str(targets[node.name])
        if target in zero_state:
            new = graph.placeholder("state_" + "".join(c if c.isalnum() else "_" for c in target))
            new.meta = dict(node.meta)
            state_nodes[target] = new
            current[target] = new
            alias[new] = target
            env[node] = new
            continue
        if kinds[node.name] == InputKind.CUSTOM_OBJ or target not in tensors:
            raise UnsupportedModelError(f"rank program input {target!r} cannot be expressed in ONNX")
        value = tensors[target]
        # stored tensors are meta in a saved program (bytes in weights.safetensors); constants are real
        root[target] = _empty_like(value) if value.is_meta else value
        if value.is_meta:
            stored.add(target)
        env[node] = graph.get_attr(target)
    missing = sorted(zero_state - set(state_nodes))
    if missing:
        raise UnsupportedModelError(f"zero_state buffer {missing[0]!r} is not an input of the rank program")

    outputs: list[Any] = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = list(torch.utils._pytree.tree_leaves(fx.map_arg(node.args[0], lambda n: env[n])))
            break
        args = fx.map_arg(node.args, lambda n: env[n])
        kwargs = fx.map_arg(node.kwargs, lambda n: env[n])
        first = args[0] if args else None
        written = alias.get(first) if isinstance(first, fx.Node) else None
        if written is not None and node.op == "call_function":
            functional = _out_of_place(node.target)
            if functional is not None:
                args = (current[written], *args[1:])
                new = graph.call_function(functional, args, kwargs)
                new.meta = dict(node.meta)
                current[written] = new
                alias[new] = written
                env[node] = new
                continue
        new = graph.node_copy(node, lambda n: env[n])
        new.args, new.kwargs = _latest(args, alias, current), _latest(kwargs, alias, current)
        env[node] = new
        if _out_of_place(node.target) is not None and _reads_state(new.args[0] if new.args else None, alias):
            raise UnsupportedModelError(
                f"{node.target} writes into a view of a KV cache buffer, which ONNX cannot express; "
                "use --format torch"
            )
    graph.output(tuple(outputs) + tuple(current[name] for name in state_nodes))
    gm = fx.GraphModule(root, graph)
    examples, dynamic = input_signature(program, user_nodes)
    state_examples = [torch.zeros_like(_empty_like(tensors[name])) for name in state_nodes]
    return StatefulModule(
        gm,
        tuple(examples) + tuple(state_examples),
        tuple(dynamic) + tuple(None for _ in state_nodes),
        [n.name for n in user_nodes],
        list(state_nodes),
        len(outputs),
        stored,
    )


def _reads_state(value: Any, alias: dict[fx.Node, str]) -> bool:
    """Whether ``value`` is a state tensor or a view of one (followed through view ops' first argument)."""
    while isinstance(value, fx.Node):
        if value in alias:
            return True
        target = value.target
        if not (isinstance(target, torch._ops.OpOverload) and target.is_view and value.args):
            return False
        value = value.args[0]
    return False


def _latest(value: Any, alias: dict[fx.Node, str], current: dict[str, Any]) -> Any:
    """Reads of a state tensor see its latest write."""
    return fx.map_arg(value, lambda n: current[alias[n]] if n in alias else n)
