"""Attaching a rank's real tensors to the meta-device module of its program.

Tensors are assigned by attribute path, not with ``load_state_dict``, so that
non-persistent buffers and lifted tensor constants are populated too.

Invariant: a tensor replaces an attribute only if the program defines it with
the same shape and dtype; parameters stay parameters, buffers stay buffers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
from torch import nn

from ..errors import ArtifactLoadError

__all__ = ["assign_tensors", "create_zero_state", "move_to_device", "unloaded_tensors"]


def _owner(module: nn.Module, key: str, source: str) -> tuple[nn.Module, str]:
    prefix, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        owner = None
    if owner is None or not (
        name in owner._parameters
        or name in owner._buffers
        or isinstance(getattr(owner, name, None), torch.Tensor)
    ):
        raise ArtifactLoadError(
            f"{source} has tensor {key!r} that the program does not define; "
            "the artifact is inconsistent, recompile it"
        )
    return owner, name


def _check_compatible(key: str, old: torch.Tensor | None, new: torch.Tensor, source: str) -> None:
    if old is None:
        return
    if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
        raise ArtifactLoadError(
            f"weights for {key} in {source} have shape {list(new.shape)} {new.dtype} but the program "
            f"expects {list(old.shape)} {old.dtype}; the artifact is inconsistent, recompile it"
        )


def assign_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Replace each attribute named by a key of ``tensors`` with that tensor.

    Parameters stay parameters (``requires_grad=False``), buffers stay buffers
    (keeping their persistence flag) and plain tensor attributes (lifted
    constants) are set directly.  ``source`` names the file in messages.

    Raises:
        ArtifactLoadError: a key names no tensor attribute, or shape/dtype differ.
    """
    for key, tensor in tensors.items():
        owner, name = _owner(module, key, source)
        if name in owner._parameters:
            _check_compatible(key, owner._parameters[name], tensor, source)
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        elif name in owner._buffers:
            _check_compatible(key, owner._buffers[name], tensor, source)
            owner._buffers[name] = tensor
        else:
            _check_compatible(key, getattr(owner, name), tensor, source)
            setattr(owner, name, tensor)


def create_zero_state(module: nn.Module, names: Sequence[str], device: torch.device) -> None:
    """Replace each (meta) buffer named in ``names`` by ``torch.zeros`` of its shape/dtype on ``device``.

    These are the per-rank KV caches: state the program writes in place and
    that is not stored in the weights file.

    Raises:
        ArtifactLoadError: a name is not a tensor of the program.
    """
    source = "manifest zero_state"
    for key in names:
        owner, name = _owner(module, key, source)
        old = owner._buffers[name] if name in owner._buffers else getattr(owner, name)
        if not isinstance(old, torch.Tensor):  # pragma: no cover - _owner checked it
            raise ArtifactLoadError(f"{source} names {key!r}, which is not a tensor of the program")
        zeros = torch.zeros(old.shape, dtype=old.dtype, device=device)
        if name in owner._buffers:
            owner._buffers[name] = zeros
        elif name in owner._parameters:
            owner._parameters[name] = nn.Parameter(zeros, requires_grad=False)
        else:
            setattr(owner, name, zeros)


def unloaded_tensors(module: nn.Module) -> list[str]:
    """Qualified names of parameters, buffers and graph constants still on ``meta``."""
    missing: list[str] = []
    for name, param in module.named_parameters(remove_duplicate=False):
        if param.is_meta:
            missing.append(name)
    for name, buf in module.named_buffers(remove_duplicate=False):
        if buf.is_meta:
            missing.append(name)
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op != "get_attr":
                continue
            qual = f"{prefix}.{node.target}" if prefix else str(node.target)
            try:
                value = _resolve(sub, str(node.target))
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and value.is_meta and qual not in missing:
                missing.append(qual)
    return missing


def _resolve(root: nn.Module, target: str) -> object:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def move_to_device(module: nn.Module, device: torch.device) -> None:
    """Move parameters, buffers and graph tensor constants of ``module`` to ``device``."""
    module.to(device)
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op != "get_attr":
                continue
            prefix, _, name = str(node.target).rpartition(".")
            try:
                owner = sub.get_submodule(prefix) if prefix else sub
            except AttributeError:
                continue
            if name in owner._parameters or name in owner._buffers:
                continue
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(owner, name, value.to(device))
