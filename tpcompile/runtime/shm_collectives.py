"""Shared-memory all-reduce and all-gather for ranks that share one CPU host.

gloo over loopback TCP costs ~1.5 ms per small all-reduce here, and a decoder layer needs two per token, so
on one host the programs' collectives are rebound to this transport: every rank writes its tensor into
its own slot of a shared-memory file, publishes a sequence number, waits until every peer has published
the same number, and reads all slots.

Invariants:
- every rank sums the slots in rank order, so replicated results are bit-identical on all ranks;
- two slots per rank alternate between calls; a rank overwrites a slot only after every peer has entered
  the next call (so has finished reading the previous use of that slot);
- the data is written before the sequence number (x86-64 keeps stores in order, so a reader that sees the
  number sees the data); other architectures, tensors larger than a slot, or ``TPCOMPILE_SHM=0`` keep gloo.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["ShmCommunicator", "shm_supported"]

SLOT_BYTES = 8 * 2**20  # per rank and parity: covers decode steps and prompts of a few thousand tokens
_HEADER = 64  # one cache line per rank for its sequence number
_TIMEOUT_S = 300.0


def shm_supported(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.environ.get("TPCOMPILE_SHM", "1") != "0"
        and Path("/dev/shm").is_dir()
    )


class ShmCommunicator:
    """Collectives among the ``world`` ranks of this host through one shared-memory file."""

    def __init__(self, rank: int, world: int, name: str, timeout_s: float = _TIMEOUT_S) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.path = Path("/dev/shm") / name
        size = world * _HEADER + world * 2 * SLOT_BYTES
        if rank == 0:
            with open(self.path, "wb") as f:
                f.truncate(size)
        dist.barrier()  # the file exists before anyone maps it
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        dist.barrier()  # everyone mapped it: rank 0 unlinks, the mapping stays valid
        if rank == 0:
            self.path.unlink(missing_ok=True)
        self._seq_view = np.frombuffer(self._map, dtype=np.int64, count=world * _HEADER // 8)
        self.seq = 0

    @classmethod
    def create(cls, rank: int, world: int, timeout_s: float = _TIMEOUT_S) -> ShmCommunicator:
        """Agree on a fresh file name through the default process group, then map it."""
        token = [f"tpcompile-{os.getpid()}-{time.monotonic_ns()}" if rank == 0 else ""]
        dist.broadcast_object_list(token, src=0)
        return cls(rank, world, str(token[0]), timeout_s)

    def _published(self, rank: int) -> int:
        return int(self._seq_view[rank * _HEADER // 8])

    def _publish(self, seq: int) -> None:
        self._seq_view[self.rank * _HEADER // 8] = seq

    def _wait_all(self, seq: int) -> None:
        deadline = None
        while True:
            if all(self._published(r) >= seq for r in range(self.world) if r != self.rank):
                return
            os.sched_yield()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout_s
            elif now > deadline:
                raise TimeoutError(f"shared-memory collective timed out after {self.timeout_s:.0f} s")

    def _slot(self, rank: int, parity: int, nbytes: int) -> np.ndarray:
        start = self.world * _HEADER + (rank * 2 + parity) * SLOT_BYTES
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=start)

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= SLOT_BYTES

    def _exchange(self, t: torch.Tensor) -> tuple[int, int]:
        """Publish ``t`` in this rank's slot; return (parity, nbytes) once every rank has published."""
        self.seq += 1
        seq, parity = self.seq, self.seq % 2
        self._wait_all(seq - 1)  # peers are done reading the slot this call overwrites
        src = t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()
        self._slot(self.rank, parity, src.size)[:] = src
        self._publish(seq)
        self._wait_all(seq)
        return parity, src.size

    def _peer(self, rank: int, parity: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        raw = torch.from_numpy(self._slot(rank, parity, nbytes))
        return raw.view(like.dtype).view(like.shape)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in rank order, as a new tensor."""
        parity, nbytes = self._exchange(t)
        acc = self._peer(0, parity, nbytes, t).clone()
        for r in range(1, self.world):
            acc += self._peer(r, parity, nbytes, t)
        return acc

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 (all ranks pass the same shape)."""
        parity, nbytes = self._exchange(t)
        return torch.cat([self._peer(r, parity, nbytes, t) for r in range(self.world)], 0)

    def close(self) -> None:
        self._map.close()


_C10D = torch.ops._c10d_functional


def rebind_collectives(module: torch.nn.Module, comm: ShmCommunicator, group_name: str) -> int:
    """Point every all-reduce / all-gather of the program's graphs at ``comm`` (tensors too large for a
    slot still go through ``group_name``); return how many collectives were rebound."""

    def all_reduce(t: torch.Tensor, op: str, group: str) -> torch.Tensor:
        if op == "sum" and comm.fits(t):
            return comm.all_reduce(t)
        return _C10D.wait_tensor(_C10D.all_reduce(t, op, group_name))

    def all_gather(t: torch.Tensor, size: int, group: str) -> torch.Tensor:
        if comm.fits(t):
            return comm.all_gather(t)
        return _C10D.wait_tensor(_C10D.all_gather_into_tensor(t, size, group_name))

    replacements = {_C10D.all_reduce.default: all_reduce, _C10D.all_gather_into_tensor.default: all_gather}
    count = 0
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        changed = False
        for node in list(sub.graph.nodes):
            if node.op == "call_function" and node.target in replacements:
                node.target = replacements[node.target]
                for user in list(node.users):
                    if user.target == _C10D.wait_tensor.default:
                        user.replace_all_uses_with(node)
                        sub.graph.erase_node(user)
                count += 1
                changed = True
        if changed:
            sub.recompile()
    return count
