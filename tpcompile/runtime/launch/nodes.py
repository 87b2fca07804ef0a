"""Where this ``tprun`` stands in a job over several hosts (``--nnodes --node-rank --master-addr
--master-port``): each host's ``tprun`` spawns its own ``tp / nnodes`` ranks, and all of them meet at
rank 0's rendezvous store on the master address.

Invariant: global rank = ``node_rank * local_ranks + local_rank``, so node 0 holds rank 0 (the store,
the answer on stdout, stdin); the same-host shared-memory transport is used only when every rank is
local (``LOCAL_WORLD_SIZE == WORLD_SIZE``, see ``launch/worker.py``), so ranks on different hosts always
talk through the process group (gloo over TCP, or NCCL).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import LaunchError

__all__ = ["LOCALHOST", "Nodes", "in_torchrun"]

LOCALHOST = "127.0.0.1"


def in_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when launched by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


@dataclass(frozen=True)
class Nodes:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = LOCALHOST
    master_port: int | None = None  # None: a free local port (one host only)

    def check(self, tp: int) -> None:
        """One-line errors for a layout that cannot work with ``tp`` ranks."""
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes must be at least 1 (got {self.nnodes})")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank must be in 0..{self.nnodes - 1} (got {self.node_rank})")
        if tp % self.nnodes:
            raise LaunchError(
                f"the artifact's {tp} ranks do not split evenly over {self.nnodes} hosts; use an --nnodes "
                f"that divides {tp}"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise LaunchError("--nnodes > 1 needs --master-port (the same on every host)")

    def local_ranks(self, tp: int) -> int:
        return tp // self.nnodes

    def global_rank(self, tp: int, local_rank: int) -> int:
        return self.node_rank * self.local_ranks(tp) + local_rank

    @property
    def hosts_rank0(self) -> bool:
        return self.node_rank == 0
