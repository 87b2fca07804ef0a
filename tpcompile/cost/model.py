"""The cost model: pure functions of a workload (``cost/workload.py``) and a hardware profile.

Per rank and step: the weights its matrix products read stream from memory (``bytes / bandwidth``) unless
the FLOPs take longer (``FLOPs / peak``: prefill), plus the host's time per op; each decode step also reads
the KV cache written so far. Collectives are barriers, so a step takes the slowest rank's time plus every
collective's, each ``latency + factor * bytes / bus bandwidth`` with the ring factors 2(n-1)/n (all-reduce)
and (n-1)/n (all-gather). Attention FLOPs are not counted (small beside the projections below a few
thousand positions).

Invariant: no I/O and no state: the same inputs give the same numbers, which the tests check by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpcompile.cost.workload import Collective, RankWork, Workload
from tpcompile.runtime.format.hardware import HardwareProfile, Link


def ring_factor(op: Collective, n: int) -> float:
    """Bytes each rank sends per byte of the value, for a ring of ``n`` ranks."""
    if n <= 1:
        return 0.0
    return (2 if op is Collective.ALL_REDUCE else 1) * (n - 1) / n


def collective_time(op: Collective, nbytes: float, n: int, link: Link) -> float:
    """Seconds of one collective over ``n`` ranks of a value of ``nbytes``; none on one rank."""
    if n <= 1:
        return 0.0
    return link.latency_s + ring_factor(op, n) * nbytes / link.bandwidth_bytes_s


@dataclass(frozen=True)
class StepTime:
    """One step: the slowest rank's parts (weights, compute, host) and the collectives, in seconds."""

    weights_s: float
    compute_s: float
    host_s: float
    comm_s: float
    slowest_rank: int

    @property
    def total_s(self) -> float:
        return max(self.weights_s, self.compute_s) + self.host_s + self.comm_s

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.total_s if self.total_s > 0 else 0.0


def _rank_time(r: RankWork, p: HardwareProfile, tp: int, tokens: int, position: int) -> tuple[float, ...]:
    on_node = p.ranks_on_node(tp)
    weights = (r.streamed_bytes + r.kv_bytes_per_position * position) / p.bandwidth_per_rank(on_node)
    compute = tokens * r.flops_per_token / p.flops_per_rank(on_node)
    return weights, compute, r.ops * p.op_overhead_s


def step_time(w: Workload, p: HardwareProfile, tokens: int, position: int = 0) -> StepTime:
    """A step of ``tokens`` tokens (1: decode, P: a prefill of P) with ``position`` positions cached."""
    parts = [_rank_time(r, p, w.tp, tokens, position) for r in w.ranks]
    slowest = max(range(len(parts)), key=lambda i: max(parts[i][0], parts[i][1]) + parts[i][2])
    link = p.collective_link(w.tp)
    comm = sum(n * collective_time(op, b * tokens, w.tp, link) for (op, b), n in w.collectives.items())
    weights, compute, host = parts[slowest]
    return StepTime(weights, compute, host, comm, slowest)


@dataclass(frozen=True)
class Prediction:
    tp: int
    profile: str
    decode_tokens_per_s: float
    ttft_s: float
    comm_share: float  # of a decode step
    bytes_per_rank: int  # the largest rank's weights + KV cache at the full length
    fits: bool
    decode: StepTime


def memory_per_rank(w: Workload) -> int:
    return max(r.weight_bytes + r.kv_bytes_per_position * w.max_seq_len for r in w.ranks)


def fits(w: Workload, p: HardwareProfile) -> bool:
    return memory_per_rank(w) <= p.memory_bytes and w.tp <= p.max_ranks_per_node * p.nodes


def predict(w: Workload, p: HardwareProfile, prompt_len: int, new_tokens: int) -> Prediction:
    """Decode speed over ``new_tokens`` after a prompt of ``prompt_len`` (the KV cache read grows linearly,
    so the mean step is the step at the middle position) and the time to the first token (the prefill)."""
    mid = prompt_len + new_tokens // 2
    decode = step_time(w, p, 1, mid)
    prefill = step_time(w, p, prompt_len, 0)
    return Prediction(
        tp=w.tp,
        profile=p.name,
        decode_tokens_per_s=1.0 / decode.total_s,
        ttft_s=prefill.total_s,
        comm_share=decode.comm_share,
        bytes_per_rank=memory_per_rank(w),
        fits=fits(w, p),
        decode=decode,
    )
