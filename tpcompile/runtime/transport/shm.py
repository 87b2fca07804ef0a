"""Shared-memory all-reduce and all-gather for ranks that share one CPU host.

gloo over loopback TCP costs ~1.5 ms per small all-reduce here, and a decoder layer needs two per token, so
on one host the programs' collectives are rebound to this transport: every rank writes its tensor into
its own slot of a shared-memory file, publishes a sequence number, waits until every peer has published
the same number, and reads all slots.

Invariants:
- every rank sums the slots in rank order (``rank_sum.rank_order_sum``: float32 additions for bf16/fp16
  payloads), so replicated results are bit-identical on all ranks;
- two slots per rank alternate between calls; a rank overwrites a slot only after every peer has entered
  the next call (so has finished reading the previous use of that slot);
- the data is written before the sequence number (x86-64 keeps stores in order, so a reader that sees the
  number sees the data); other architectures, tensors larger than a slot, or ``TPCOMPILE_SHM=0`` keep gloo;
- a waiting rank never outlives its peers: it raises :class:`CollectiveError` when a rank it waits for no
  longer exists (each rank's pid is in the header) or after ``--timeout`` seconds.
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
from torch.profiler import record_function

from ..errors import CollectiveError
from .rank_sum import group_all_reduce, rank_order_sum
from .segments import SEGMENT_PREFIX, SHM_DIR, process_alive

__all__ = ["ShmCommunicator", "shm_supported"]

SLOT_BYTES = 8 * 2**20  # per rank and parity: covers decode steps and prompts of a few thousand tokens
_HEADER = 64  # one cache line per rank: its sequence number (int64 #0) and its pid (int64 #1)
_TIMEOUT_S = 300.0
_LIVENESS_S = 0.25  # how often a waiting rank checks that the ranks it waits for still exist
_SPIN_S = 0.05  # after this long without progress, sleep between polls instead of only yielding


def shm_supported(device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and platform.machine().lower() in ("x86_64", "amd64")
        and os.environ.get("TPCOMPILE_SHM", "1") != "0"
        and SHM_DIR.is_dir()
    )


def _segment_size(world: int) -> int:
    return world * _HEADER + world * 2 * SLOT_BYTES


class ShmCommunicator:
    """Collectives among the ``world`` ranks of this host through one shared-memory file.

    A rank waiting for its peers gives up with :class:`CollectiveError` as soon as one of them no longer
    exists, or after ``timeout_s`` seconds without them publishing.
    """

    def __init__(self, rank: int, world: int, path: Path, timeout_s: float = _TIMEOUT_S) -> None:
        """Map the existing segment file ``path`` (see :meth:`create`) and publish this rank's pid."""
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.path = path
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _segment_size(world))
        self._header = np.frombuffer(self._map, dtype=np.int64, count=world * _HEADER // 8)
        self._header[self._index(rank) + 1] = os.getpid()
        self.seq = 0
        #: time spent in collectives (waiting for peers included) and how many, for ``tprun --profile``
        self.seconds = 0.0
        self.calls = 0
        # one byte view per (rank, parity) slot, made once: a decode step makes ~60 collectives
        self._slots = [[self._slot_view(r, q) for q in (0, 1)] for r in range(world)]

    @classmethod
    def create(cls, rank: int, world: int, timeout_s: float = _TIMEOUT_S) -> ShmCommunicator:
        """Agree on a fresh file name through the default process group, create and map it.

        Rank 0 unlinks the file once every rank has mapped it (or when the setup fails), so nothing is
        left in /dev/shm; if rank 0 is killed in between, :func:`remove_segments` cleans up.
        """
        token = [f"{SEGMENT_PREFIX}{os.getpid()}-{time.monotonic_ns()}" if rank == 0 else ""]
        dist.broadcast_object_list(token, src=0)
        path = SHM_DIR / str(token[0])
        try:
            if rank == 0:
                with open(path, "wb") as f:
                    f.truncate(_segment_size(world))
            dist.barrier()  # the file exists before anyone maps it
            comm = cls(rank, world, path, timeout_s)
            dist.barrier()  # everyone mapped it (and published its pid): rank 0 unlinks
        finally:
            if rank == 0:
                path.unlink(missing_ok=True)
        return comm

    def _index(self, rank: int) -> int:
        return rank * _HEADER // 8

    def _published(self, rank: int) -> int:
        return int(self._header[self._index(rank)])

    def _publish(self, seq: int) -> None:
        self._header[self._index(self.rank)] = seq

    def _check_peers(self, waiting: list[int], started: float) -> None:
        for r in waiting:
            pid = int(self._header[self._index(r) + 1])
            if pid and not process_alive(pid):
                raise CollectiveError(f"rank {r} (pid {pid}) exited during a collective")
        if time.monotonic() - started > self.timeout_s:
            names = ", ".join(map(str, waiting))
            raise CollectiveError(
                f"collective timed out after {self.timeout_s:g} s waiting for rank {names} "
                "(raise --timeout if a rank is legitimately this slow)"
            )

    def _laggards(self, seq: int) -> list[int]:
        return [r for r in range(self.world) if r != self.rank and self._published(r) < seq]

    def _wait_all(self, seq: int) -> None:
        """Return once every peer has published ``seq``; raise :class:`CollectiveError` if one has exited
        or ``timeout_s`` has passed."""
        waiting = self._laggards(seq)
        if not waiting:
            return
        started = checked = time.monotonic()
        while waiting:
            now = time.monotonic()
            if now - checked > _LIVENESS_S:
                checked = now
                self._check_peers(waiting, started)
            if now - started > _SPIN_S:
                time.sleep(0.0002)
            else:
                os.sched_yield()
            waiting = self._laggards(seq)

    def _slot_view(self, rank: int, parity: int) -> torch.Tensor:
        start = self.world * _HEADER + (rank * 2 + parity) * SLOT_BYTES
        return torch.frombuffer(self._map, dtype=torch.uint8, count=SLOT_BYTES, offset=start)

    def layout(self) -> tuple[int, int, int]:
        """(address of the mapped segment, header bytes per rank, slot bytes): what the C++ transport of
        ``kernels/cpu_ops.cpp`` needs to speak this protocol on the same mapping."""
        return int(self._header.ctypes.data), _HEADER, SLOT_BYTES

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= SLOT_BYTES

    def _exchange(self, t: torch.Tensor) -> tuple[int, int]:
        """Publish ``t`` in this rank's slot; return (parity, nbytes) once every rank has published."""
        self.seq = self._published(self.rank) + 1  # the header's count: C++ calls (cpu_ops) advance it too
        seq, parity = self.seq, self.seq % 2
        self._wait_all(seq - 1)  # peers are done reading the slot this call overwrites
        src = t.detach().contiguous().reshape(-1).view(torch.uint8)
        nbytes = src.numel()
        self._slots[self.rank][parity][:nbytes].copy_(src)
        self._publish(seq)
        self._wait_all(seq)
        return parity, nbytes

    def _peer(self, rank: int, parity: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
        return self._slots[rank][parity][:nbytes].view(like.dtype).view(like.shape)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in rank order (float32 additions for half payloads), as a new tensor."""
        if torch.autograd._profiler_enabled():  # tprun --profile: show the call (free otherwise)
            with record_function("tpcompile::shm_all_reduce"):
                return self._all_reduce(t)
        return self._all_reduce(t)

    def _timed(self, started: float) -> None:
        self.seconds += time.perf_counter() - started
        self.calls += 1

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        parity, nbytes = self._exchange(t)
        acc = rank_order_sum([self._peer(r, parity, nbytes, t) for r in range(self.world)])
        self._timed(started)
        return acc

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 (all ranks pass the same shape)."""
        if torch.autograd._profiler_enabled():
            with record_function("tpcompile::shm_all_gather"):
                return self._all_gather(t)
        return self._all_gather(t)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        parity, nbytes = self._exchange(t)
        gathered = torch.cat([self._peer(r, parity, nbytes, t) for r in range(self.world)], 0)
        self._timed(started)
        return gathered

    def close(self) -> None:
        """Unmap the segment; collectives return new tensors, so only this object's views hold it."""
        self._slots = []
        self._header = np.zeros(0, dtype=np.int64)
        self._map.close()


_C10D = torch.ops._c10d_functional


def rebind_collectives(module: torch.nn.Module, comm: ShmCommunicator, group_name: str) -> int:
    """Point every all-reduce / all-gather of the program's graphs at ``comm`` (tensors too large for a
    slot still go through ``group_name``); return how many collectives were rebound."""

    def all_reduce(t: torch.Tensor, op: str, group: str) -> torch.Tensor:
        if op != "sum":
            return _C10D.wait_tensor(_C10D.all_reduce(t, op, group_name))
        return comm.all_reduce(t) if comm.fits(t) else group_all_reduce(t, group_name, comm.world)

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
