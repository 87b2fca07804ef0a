"""Running one rank of an ONNX-format artifact: segments on onnxruntime, collectives on torch.distributed.

Invariant: a call walks the rank's steps in manifest order, so every rank issues the same collectives in
the same order as the torch-format program would. Values stay where they were produced (OrtValues from
onnxruntime, tensors from collectives) and are handed over by DLPack, never copied. The KV cache is two
buffers per cache tensor: a call reads one (``in.NAME``) and onnxruntime writes the updated cache straight
into the other (``out.NAME``); the next call swaps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactCorrupt, ArtifactLoadError
from ..format import STATE_IN, STATE_OUT, Collective, Manifest, OnnxRank, Segment, onnx_rank
from ..load.program import RankProgram
from ..transport.shm import ShmCommunicator
from .session import SegmentSession, import_onnxruntime

__all__ = ["OnnxRankProgram", "load_onnx_rank"]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_C10D = torch.ops._c10d_functional


class OnnxRankProgram(RankProgram):
    """A :class:`RankProgram` whose forward pass is the rank's ONNX segments (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        device: torch.device,
        graph: OnnxRank,
        sessions: list[SegmentSession],
        group_name: str,
    ) -> None:
        super().__init__(manifest, rank, device, nn.Module(), group_name)
        self.graph = graph
        self._steps: list[tuple[Collective | None, SegmentSession | None]] = []
        it = iter(sessions)
        for step in graph.steps:
            self._steps.append((None, next(it)) if isinstance(step, Segment) else (step, None))
        self._user = [s.name for s in graph.inputs if not s.name.startswith(STATE_IN)]
        self._outputs = [s.name for s in graph.outputs if not s.name.startswith(STATE_OUT)]
        ort = import_onnxruntime()
        self._state: dict[str, list[torch.Tensor]] = {}
        self._state_ov: dict[str, list[Any]] = {}
        for spec in graph.state:
            if spec.dtype not in _DTYPES or not all(isinstance(d, int) for d in spec.shape):
                raise ArtifactLoadError(f"KV cache {spec.name!r} needs a static shape and a known dtype")
            shape = [int(d) for d in spec.shape]
            bufs = [torch.zeros(shape, dtype=_DTYPES[spec.dtype], device=device) for _ in range(2)]
            self._state[spec.name] = bufs
            self._state_ov[spec.name] = [ort.OrtValue.from_dlpack(b) for b in bufs]
        self._parity = 0
        self._comm: ShmCommunicator | None = None

    def bind_group(self, group_name: str) -> int:
        """Collectives run on process group ``group_name``; returns how many steps are collectives."""
        self.group_name = group_name
        return sum(1 for c, _ in self._steps if c is not None)

    def use_shared_memory(self, comm: ShmCommunicator) -> int:
        """Same-host ranks: the collectives between segments exchange through ``comm`` (tensors too large
        for a slot still use the group); returns how many steps are collectives."""
        self._comm = comm
        return sum(1 for c, _ in self._steps if c is not None)

    def _collective(self, step: Collective, t: torch.Tensor) -> torch.Tensor:
        comm = self._comm
        if step.op == "all_reduce":
            if comm is not None and step.reduce_op == "sum" and comm.fits(t):
                return comm.all_reduce(t)
            return _C10D.wait_tensor(_C10D.all_reduce(t, step.reduce_op, self.group_name))
        if comm is not None and comm.fits(t):
            return comm.all_gather(t)
        return _C10D.wait_tensor(_C10D.all_gather_into_tensor(t, step.group_size, self.group_name))

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run the rank's steps on positional ``inputs``; return the flat outputs (manifest order)."""
        if len(inputs) != len(self._user):
            raise ArtifactLoadError(f"program takes {len(self._user)} inputs, got {len(inputs)}")
        env: dict[str, Any] = {
            n: t.to(self.device).contiguous() for n, t in zip(self._user, inputs, strict=True)
        }
        cur, nxt = self._parity, 1 - self._parity
        preset: dict[str, Any] = {}
        for name, ovs in self._state_ov.items():
            env[name] = ovs[cur]
            preset[STATE_OUT + name[len(STATE_IN) :]] = ovs[nxt]
        with torch.inference_mode():
            for collective, segment in self._steps:
                if segment is not None:
                    for name, value in zip(segment.outputs, segment.run(env, preset), strict=True):
                        env[name] = value
                elif collective is not None:
                    env[collective.output] = self._collective(collective, _tensor(env[collective.input]))
        self._parity = nxt
        return [_tensor(env[name]) for name in self._outputs]


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_dlpack(value)


def load_onnx_rank(
    manifest: Manifest, rank: int, device: torch.device, group_name: str | None
) -> OnnxRankProgram:
    """Open one onnxruntime session per segment of ``rank`` (files already hash-checked by the caller)."""
    graph = onnx_rank(manifest, rank)
    entry = manifest.rank_entry(rank)
    rank_dir = Path(manifest.path) / entry.dir
    sessions = []
    for seg in graph.segments:
        path = rank_dir / seg.file
        if not path.is_file():
            raise ArtifactCorrupt(f"artifact incomplete: {entry.relpath(seg.file)} is missing")
        sessions.append(SegmentSession.open(path, entry.relpath(seg.file), seg.inputs, seg.outputs, device))
    program = OnnxRankProgram(manifest, rank, device, graph, sessions, manifest.group_name)
    if group_name is not None:
        program.bind_group(group_name)
    return program
