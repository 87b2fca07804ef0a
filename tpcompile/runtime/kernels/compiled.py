"""Opt-in ahead-of-decode compilation of a rank's program with TorchInductor (``tprun --compile``).

A decode step runs a few thousand small ops; dispatched one by one they cost more than the matrix
products.  Inductor fuses them into a few generated kernels.  The program's collectives must survive
that: dynamo cannot trace into the shared-memory transport (numpy on an mmap) nor resolve a process
group by name inside a compiled graph on every torch version, so every collective node is replaced by
an opaque custom op (``tpcompile::all_reduce_sum`` / ``tpcompile::all_gather``) whose kernel calls the
transport bound with :func:`bind_transport`.

Invariants:
- only the decode shape (one new token per row) is compiled, with static shapes, so a prompt of any
  length never triggers a recompile; prefill keeps running the eager program;
- both paths run the same collectives in the same order on every rank (the custom ops are the same
  calls the eager program makes), so ranks cannot diverge;
- numerics: Inductor may fuse and reorder floating-point work, so logits can differ from the eager
  program by round-off; greedy tokens are compared in the tests;
- on CUDA the compiled step is also replayed as a CUDA graph (Inductor's cudagraph trees: one launch per
  step instead of one per kernel) when its collectives can be captured (NCCL, or a single rank; not gloo,
  which stages through the host) and ``TPCOMPILE_CUDA_GRAPHS`` is not ``0``; a replay overwrites the
  previous step's outputs, which the caller has consumed by then (the token is chosen at once).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.fx.node import Argument
from torch.utils._pytree import tree_flatten

from ..errors import InputError
from ..load.program import RankProgram
from ..transport.rank_sum import group_all_reduce
from ..transport.shm import ShmCommunicator

__all__ = [
    "Transport",
    "bind_transport",
    "compile_decode_step",
    "prepare_compiled_decode",
    "use_cuda_graphs",
    "use_transport_ops",
]

_C10D = torch.ops._c10d_functional


class Transport(Protocol):
    """What the custom ops call: a sum all-reduce and a dim-0 all-gather over the rank's group."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor: ...


class _GroupTransport:
    """Collectives through a named process group (gloo / NCCL), for when no shared memory is set up."""

    def __init__(self, group_name: str, world: int) -> None:
        self.group_name, self.world = group_name, world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return group_all_reduce(t, self.group_name, self.world)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return _C10D.wait_tensor(_C10D.all_gather_into_tensor(t, self.world, self.group_name))


class _SharedMemoryTransport:
    """The same-host shared-memory transport; tensors too large for its slots go through the group."""

    def __init__(self, comm: ShmCommunicator, fallback: _GroupTransport) -> None:
        self.comm, self.fallback = comm, fallback

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t) if self.comm.fits(t) else self.fallback.all_reduce(t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(t) if self.comm.fits(t) else self.fallback.all_gather(t)


_TRANSPORT: Transport | None = None


#: Called with every binding (``cpu_ops`` registers the binding of its C++ kernels here).
BIND_HOOKS: list[Callable[[str, int, ShmCommunicator | None], None]] = []
_BINDING: tuple[str, int, ShmCommunicator | None] | None = None


def bind_transport(group_name: str, world: int, shared_memory: ShmCommunicator | None = None) -> None:
    """Make the custom ops use process group ``group_name`` of ``world`` ranks, through
    ``shared_memory`` when the ranks share a host and it was set up."""
    global _TRANSPORT, _BINDING
    group = _GroupTransport(group_name, world)
    _TRANSPORT = group if shared_memory is None else _SharedMemoryTransport(shared_memory, group)
    _BINDING = (group_name, world, shared_memory)
    for hook in BIND_HOOKS:
        hook(group_name, world, shared_memory)


def current_binding() -> tuple[str, int, ShmCommunicator | None] | None:
    """The arguments of the last :func:`bind_transport`, or None before the first."""
    return _BINDING


def _transport() -> Transport:
    if _TRANSPORT is None:
        raise RuntimeError("tpcompile collective op called before bind_transport()")
    return _TRANSPORT


@torch.library.custom_op("tpcompile::all_reduce_sum", mutates_args=())
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, as a new contiguous tensor (the layout compiled code assumes, see the fake)."""
    return _transport().all_reduce(t).contiguous()


@all_reduce_sum.register_fake
def _all_reduce_sum_fake(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


@torch.library.custom_op("tpcompile::all_gather", mutates_args=())
def all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``t`` concatenated on dim 0, as a new contiguous tensor."""
    return _transport().all_gather(t).contiguous()


@all_gather.register_fake
def _all_gather_fake(t: torch.Tensor, world: int) -> torch.Tensor:
    return t.new_empty((t.shape[0] * world, *t.shape[1:]))


def _replacement(node: torch.fx.Node) -> tuple[Callable[..., torch.Tensor], tuple[Argument, ...]] | None:
    if node.target == _C10D.all_reduce.default:
        tensor, op = node.args[0], node.args[1]
        if op != "sum":
            raise InputError(f"all_reduce with op {op!r} cannot be compiled; run without --compile")
        return torch.ops.tpcompile.all_reduce_sum.default, (tensor,)
    if node.target == _C10D.all_gather_into_tensor.default:
        return torch.ops.tpcompile.all_gather.default, (node.args[0], node.args[1])
    return None


def use_transport_ops(module: torch.nn.Module) -> int:
    """Replace the program's functional collectives (and their waits) by the transport custom ops."""
    count = 0
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        changed = False
        for node in list(sub.graph.nodes):
            if node.op != "call_function":
                continue
            replacement = _replacement(node)
            if replacement is None:
                continue
            target, args = replacement
            with sub.graph.inserting_after(node):
                new = sub.graph.call_function(target, args)
            new.meta = dict(node.meta)
            for user in list(node.users):
                if user.target == _C10D.wait_tensor.default:
                    user.replace_all_uses_with(new)
                    sub.graph.erase_node(user)
            node.replace_all_uses_with(new)
            sub.graph.erase_node(node)
            count += 1
            changed = True
        if changed:
            sub.graph.lint()
            sub.recompile()
    return count


def prepare_compiled_decode(
    program: RankProgram, group_name: str, world: int, shared_memory: ShmCommunicator | None
) -> None:
    """Turn ``program``'s collectives into transport ops bound to ``group_name`` / ``shared_memory``."""
    if not any(isinstance(m, torch.fx.GraphModule) for m in program.module.modules()):
        raise InputError("--compile needs a torch-format artifact; run this ONNX artifact without --compile")
    use_transport_ops(program.module)
    bind_transport(group_name, world, shared_memory)


def use_cuda_graphs(program: RankProgram) -> bool:
    """Whether ``program``'s compiled decode step is replayed as a CUDA graph (see the module invariants)."""
    if program.device.type != "cuda" or os.environ.get("TPCOMPILE_CUDA_GRAPHS", "1") == "0":
        return False
    binding = current_binding()
    return binding is None or binding[1] == 1 or "nccl" in str(dist.get_backend())


def compile_decode_step(program: RankProgram) -> Callable[..., list[torch.Tensor]]:
    """``program``'s forward pass compiled by Inductor for static shapes, returning the flat outputs.

    The program's collectives must already be transport ops (:func:`use_transport_ops`); a functional
    collective left in the graph is refused rather than compiled.
    """
    for sub in program.module.modules():
        if isinstance(sub, torch.fx.GraphModule) and any(
            n.op == "call_function" and _replacement(n) is not None for n in sub.graph.nodes
        ):
            raise RuntimeError("compile_decode_step: call use_transport_ops(program.module) first")
    import torch._inductor.config as inductor_config

    # no pool of compile workers: every rank compiles at once and already has its share of the cores
    inductor_config.compile_threads = 1
    # the module's parameters never change after loading: guarding every one of them on every call cost
    # ~0.8 ms per decode step; inputs and buffers (the KV cache) keep their guards
    keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)
    options: dict[str, str | int | bool | Callable[..., Any]] = {"guard_filter_fn": keep} if keep else {}
    graphs = use_cuda_graphs(program)
    if graphs:
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
    compiled = torch.compile(program.module, dynamic=False, options=options or None)

    def step(*inputs: torch.Tensor) -> list[torch.Tensor]:
        moved = [t.to(program.device) for t in inputs]
        if graphs:  # the previous step's outputs are consumed: the next replay may overwrite them
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode():
            result = compiled(*moved)
        leaves, _ = tree_flatten(result)
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    return step
