"""C++ CPU kernels for tpcompile's custom ops (``cpu_ops.cpp``), so that compiled code calls them without a
Python call: ``tpcompile::streaming_linear`` (the decode matrix-vector product), ``tpcompile::all_reduce_sum``
/ ``tpcompile::all_gather`` (the same-host shared-memory transport, or the bound process group) and
``tpcompile::prefix_attention``; and the runtime's greedy choice over vocabulary-sharded logits in one call
through the same transport (:func:`shared_memory_argmax`).

The ops are defined (schema, fake kernel, a Python kernel for every device) where they live in Python
(:mod:`.streaming_linear`, :mod:`.compiled`, :mod:`.prefix_attention`); loading this library adds a CPU kernel
to each, which the dispatcher prefers for CPU tensors. It is built on first use with the host's C++ compiler
against the running torch (about a minute), cached per source, CPU and torch version in
``$TPCOMPILE_CACHE`` (default ``~/.cache/tpcompile``).

Invariants:
- results equal the Python kernels' (the same additions in the same order for the collectives; fp32
  round-off for the matrix-vector product, whose summation order is fixed per output element);
- once loaded, the CPU collectives are bound by every ``compiled.bind_transport`` (and by the one before
  the load), exactly as the Python ones;
- a failed build is not an error: the Python kernels keep running (``TPCOMPILE_CPU_KERNELS=0`` skips it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..transport.shm import ShmCommunicator
from . import compiled as _collective_ops  # defines the collective ops this library implements
from . import prefix_attention as _attention_ops  # noqa: F401
from . import streaming_linear as _linear_ops  # noqa: F401
from .cpp_library import load_cpp_library

__all__ = [
    "C_SHIMS",
    "KERNELS_OFF",
    "attach",
    "collective_seconds",
    "cpu_ops_loaded",
    "load_cpu_ops",
    "shared_memory_argmax",
]

#: Why the library may be missing, for a user's message.
KERNELS_OFF = "no C++ compiler, or TPCOMPILE_CPU_KERNELS=0"

#: The C functions through which a native program (an AOTInductor package, ``artifact/native.py``) calls
#: each op, by op name: AOTInductor's ``custom_ops_to_c_shims`` declarations, implemented at the end of
#: ``cpu_ops.cpp``. A package compiled with them needs this library loaded (globally) before it loads.
C_SHIMS = {
    "streaming_linear": "AOTITorchError aoti_torch_cpu_streaming_linear(AtenTensorHandle x, "
    "AtenTensorHandle weight, AtenTensorHandle* bias, AtenTensorHandle* ret0)",
    "all_reduce_sum": "AOTITorchError aoti_torch_cpu_all_reduce_sum(AtenTensorHandle t, "
    "AtenTensorHandle* ret0)",
    "all_gather": "AOTITorchError aoti_torch_cpu_all_gather(AtenTensorHandle t, int64_t world, "
    "AtenTensorHandle* ret0)",
    "prefix_attention": "AOTITorchError aoti_torch_cpu_prefix_attention(AtenTensorHandle query, "
    "AtenTensorHandle key, AtenTensorHandle value, AtenTensorHandle* attn_mask, double dropout_p, "
    "int32_t is_causal, double* scale, int32_t enable_gqa, AtenTensorHandle* ret0)",
    "computed_once": "AOTITorchError aoti_torch_cpu_computed_once(AtenTensorHandle t, "
    "AtenTensorHandle* ret0)",
}

_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_LOADED: bool | None = None
_SHARED_WORLD = 0  # ranks of the shared-memory segment the C++ collectives are attached to (0: none)
_SLOT_BYTES = 0  # bytes of one of its slots
_ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # widened to fp32 exactly


def load_cpu_ops() -> bool:
    """Build (once per host and torch) and load the CPU kernels; False where they cannot be had."""
    global _LOADED
    if _LOADED is None:
        _LOADED = load_cpp_library(_SOURCE, "cpu-ops")
        if _LOADED:
            _collective_ops.BIND_HOOKS.append(attach)
            bound = _collective_ops.current_binding()
            if bound is not None:
                attach(*bound)
    return _LOADED


def cpu_ops_loaded() -> bool:
    """True once :func:`load_cpu_ops` has loaded the library in this process."""
    return bool(_LOADED)


def attach(group_name: str, world: int, comm: ShmCommunicator | None) -> None:
    """Bind the CPU collectives: the shared-memory segment of ``comm`` (same-host ranks), else only the
    process group ``group_name`` of ``world`` ranks. Does nothing while the library is not loaded."""
    global _SHARED_WORLD, _SLOT_BYTES
    if not _LOADED:
        return
    if comm is None:
        torch.ops.tpcompile_cpu.attach(0, 0, world, 0, 0, 0.0, group_name)
        _SHARED_WORLD = _SLOT_BYTES = 0
        return
    address, header, slot = comm.layout()
    torch.ops.tpcompile_cpu.attach(address, comm.rank, world, header, slot, comm.timeout_s, group_name)
    _SHARED_WORLD, _SLOT_BYTES = world, slot


def shared_memory_argmax(local: torch.Tensor, valid: int, offset: int, world: int) -> torch.Tensor | None:
    """The global greedy ids ``[B]`` of vocabulary-sharded logits ``local`` (``[B, V_local]``, this rank's
    real ids ``[offset, offset + valid)``) in one C++ call through the shared-memory segment of ``world``
    ranks (``lm/sampling.distributed_argmax``'s result); None when the C++ collectives are not attached
    to such a segment, or ``local`` is not a 2-D fp32 / bf16 / fp16 CPU tensor whose (value, id) pairs fit
    a slot (the caller then gathers in Python)."""
    if world != _SHARED_WORLD or world < 2 or local.device.type != "cpu" or local.dim() != 2:
        return None
    if local.dtype not in _ARGMAX_DTYPES or local.shape[0] * 16 > _SLOT_BYTES:
        return None
    return torch.ops.tpcompile_cpu.sharded_argmax(local, valid, offset)


def collective_seconds() -> tuple[float, int]:
    """(seconds, calls) the C++ shared-memory collectives have taken in this process (zeros if not loaded)."""
    if not _LOADED:
        return 0.0, 0
    seconds, calls = torch.ops.tpcompile_cpu.clock()
    return float(seconds), int(calls)
