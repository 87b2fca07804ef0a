"""What one forward step of each rank does, as numbers the cost model needs: the workload of a plan.

Invariant: plain data, read off a plan (``cost/extract.py``) or a manifest's ``extra.cost`` section
(``Workload.from_json``), never guessed from names; quantities are per token where they grow with the
tokens of a step (FLOPs, collective bytes) and per step where they do not (weights read, ops).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class Collective(str, enum.Enum):
    """The collectives a plan's programs hold (the manifest's ``collectives[].op``)."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RankWork:
    """One rank's share of a step."""

    weight_bytes: int  # stored on the rank (its shard)
    streamed_bytes: int  # read once per step by its matrix products (lookup tables are not streamed)
    flops_per_token: float  # matrix-product FLOPs per token of the step
    kv_bytes_per_position: int  # KV cache bytes per cached position (read by each decode step)
    ops: int  # ops in the rank's program (each costs the host some time per step)

    def scaled(self, k: float) -> RankWork:
        return RankWork(
            round(self.weight_bytes * k),
            round(self.streamed_bytes * k),
            self.flops_per_token * k,
            round(self.kv_bytes_per_position * k),
            round(self.ops * k),
        )

    def plus(self, other: RankWork) -> RankWork:
        return RankWork(
            self.weight_bytes + other.weight_bytes,
            self.streamed_bytes + other.streamed_bytes,
            self.flops_per_token + other.flops_per_token,
            self.kv_bytes_per_position + other.kv_bytes_per_position,
            self.ops + other.ops,
        )


@dataclass(frozen=True)
class Workload:
    """Every rank's work and the collectives of one step (op, bytes per token of the step) -> count."""

    tp: int
    ranks: tuple[RankWork, ...]
    collectives: Counter[tuple[Collective, int]] = field(default_factory=Counter)
    max_seq_len: int = 0  # positions every rank's KV cache holds (0: no cache)

    def collective_count(self) -> int:
        return sum(self.collectives.values())

    def largest_rank_bytes(self) -> int:
        """The most bytes one rank holds: its weights and a full KV cache."""
        return max(r.weight_bytes + r.kv_bytes_per_position * self.max_seq_len for r in self.ranks)

    def extrapolated(self, deeper: Workload, layers: int) -> Workload:
        """The workload of ``layers`` identical layers, from this one (1 layer) and ``deeper`` (2 layers):
        ``self + (layers - 1) * (deeper - self)``, exact when the layers are identical."""
        extra = layers - 1
        ranks = tuple(
            a.plus(b.plus(a.scaled(-1)).scaled(extra)) for a, b in zip(self.ranks, deeper.ranks, strict=True)
        )
        per_layer = deeper.collectives - self.collectives
        collectives = Counter(self.collectives)
        for key, n in per_layer.items():
            collectives[key] += n * extra
        return Workload(self.tp, ranks, collectives, self.max_seq_len)

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "max_seq_len": self.max_seq_len,
            "ranks": [vars(r) for r in self.ranks],
            "collectives": [
                {"op": str(op), "bytes_per_token": b, "count": n}
                for (op, b), n in sorted(self.collectives.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        return cls(
            int(data["tp"]),
            tuple(RankWork(**r) for r in data["ranks"]),
            Counter(
                {
                    (Collective(c["op"]), int(c["bytes_per_token"])): int(c["count"])
                    for c in data["collectives"]
                }
            ),
            int(data.get("max_seq_len", 0)),
        )
