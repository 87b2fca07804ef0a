"""In-place rewrites of the FX graphs inside a loaded program.

The compiler bakes two placeholders into each rank's program that only make
sense at run time:

* the process-group name passed to ``torch.ops._c10d_functional`` collectives
  (``manifest["group_name"]``), which must become the name of the live group;
* ``device=`` arguments of factory ops (``arange``, ``zeros``, ``_to_copy``...),
  recorded as the export device (usually ``meta`` or ``cpu``), which must
  become the run device.

Invariant: a rewrite changes only these arguments or a call's target, never the
graph's structure, and recompiles exactly the graph modules it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx

from ..errors import ArtifactLoadError

__all__ = [
    "COLLECTIVE_NAMESPACES",
    "graph_modules",
    "retarget_calls",
    "rewrite_collective_groups",
    "rewrite_devices",
    "tensors_on_cpu",
]

#: Maps a node to the (args, kwargs) its new target takes.
ArgMap = Callable[[torch.fx.Node], tuple[tuple[Any, ...], dict[str, Any]]]

#: Operator namespaces whose ops take a ``group_name`` string argument.
COLLECTIVE_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional", "_c10d_functional_autograd"})


def graph_modules(module: torch.nn.Module) -> Iterator[torch.fx.GraphModule]:
    """Yield every GraphModule in ``module`` (including higher-order-op subgraphs)."""
    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            yield sub


def _group_arg_index(target: Any) -> int | None:
    """Index of the ``group_name`` argument of a c10d functional op, else None."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in COLLECTIVE_NAMESPACES:
        return None
    for i, arg in enumerate(target._schema.arguments):
        if arg.name == "group_name":
            return i
    return None


def _rewrite_group(node: torch.fx.Node, index: int, old: str, new: str) -> bool:
    """Replace ``old`` by ``new`` as ``node``'s group argument; True if changed."""
    args = list(node.args)
    if index < len(args):
        current = args[index]
    elif "group_name" in node.kwargs:
        current = node.kwargs["group_name"]
    else:
        return False
    if current == new:
        return False
    if current != old:
        raise ArtifactLoadError(
            f"program uses process group {current!r} but the manifest declares {old!r}; "
            "the artifact is inconsistent, recompile it"
        )
    if index < len(args):
        args[index] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "group_name": new}
    return True


def rewrite_collective_groups(module: torch.nn.Module, old: str, new: str) -> int:
    """Point every c10d functional collective at process group ``new``.

    Returns the number of rewritten nodes.

    Raises:
        ArtifactLoadError: a collective references a group other than ``old``.
    """
    count = 0
    for gm in graph_modules(module):
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            index = _group_arg_index(node.target)
            if index is not None and _rewrite_group(node, index, old, new):
                changed = True
                count += 1
        if changed:
            gm.recompile()
    return count


def _map_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value != device:
        return device
    return value


def rewrite_devices(module: torch.nn.Module, device: torch.device) -> int:
    """Replace every ``torch.device`` constant baked into graph nodes by ``device``.

    Returns the number of rewritten nodes.
    """
    count = 0
    for gm in graph_modules(module):
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            new_args = tuple(_map_device(a, device) for a in node.args)
            new_kwargs = {k: _map_device(v, device) for k, v in node.kwargs.items()}
            same_args = all(a is b for a, b in zip(new_args, node.args, strict=True))
            same_kwargs = all(new_kwargs[k] is v for k, v in node.kwargs.items())
            if not (same_args and same_kwargs):
                node.args = new_args
                node.kwargs = new_kwargs
                changed = True
                count += 1
        if changed:
            gm.recompile()
    return count


def retarget_calls(
    module: torch.nn.Module,
    old: Any,
    new: Callable[..., Any],
    arg_map: ArgMap | None = None,
    where: Callable[[torch.fx.Node], bool] | None = None,
) -> int:
    """Make every ``call_function`` node of ``old`` (that ``where`` accepts) call ``new``, with its
    arguments remapped by ``arg_map`` if given; return how many nodes changed."""
    count = 0
    for gm in graph_modules(module):
        changed = False
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target != old or (where is not None and not where(node)):
                continue
            if arg_map is not None:
                node.args, node.kwargs = arg_map(node)
            node.target = new
            changed = True
            count += 1
        if changed:
            gm.recompile()
    return count


def tensors_on_cpu(module: torch.nn.Module) -> bool:
    """True when every parameter and buffer of ``module`` is a CPU tensor: the CPU-only decode rewrites
    (a C kernel, host-side cuts) ask this first and leave a program on any other device as it is."""
    tensors = [*module.parameters(), *module.buffers()]
    return all(t.device.type == "cpu" for t in tensors)
