"""``tprun --profile``: where a decode step of one rank goes.

A step is split into
- **weights**: the rank's weight bytes over the read bandwidth this host measured for the rank's threads
  (the floor: a decode step reads every weight once),
- **kernels**: time inside compute kernels beyond that floor,
- **collectives**: time inside all-reduces / all-gathers, waiting for the other ranks included,
- **host**: the rest of the step: Python, dispatch and launch overhead between kernels (for a native
  program this includes Inductor's fused elementwise kernels, which a profiler sees only when they are
  compiled with a mark around each, at a cost to every step; its matrix products and attention are seen).

Invariants: step and collective times are measured on plain steps, without the profiler (its own cost
never counts as overhead; the same-host transport keeps a cheap clock); only the kernel time comes from
a few profiled steps of the same prompt (and the collective time too when the ranks talk through a
process group, which has no clock); the four parts add up to the step time: the measured parts are capped
at what the step leaves for them (profiled steps run slower than plain ones), and none is below 0.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from ..kernels.cpu_ops import collective_seconds
from ..transport.collectives import collective_clock

__all__ = ["DecodeProfile", "StepProfiler", "read_bandwidth"]

T = TypeVar("T")
_COLLECTIVE_MARKS = ("all_reduce", "all_gather", "wait_tensor", "broadcast")
_BANDWIDTH: dict[int, float] = {}


def _clock() -> tuple[float, int] | None:
    """(seconds, calls) in same-host collectives so far, Python and C++ kernels together; None when the
    ranks do not use the same-host transport."""
    python = collective_clock()
    if python is None:
        return None
    native = collective_seconds()
    return python[0] + native[0], python[1] + native[1]


def read_bandwidth(nbytes: int = 256 * 2**20, *, remeasure: bool = False) -> float:
    """Bytes per second this process reads from memory with its torch threads (measured once per thread
    count, or again with ``remeasure``: the best of three sums over a buffer larger than any cache)."""
    threads = torch.get_num_threads()
    if remeasure or threads not in _BANDWIDTH:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - start)
        _BANDWIDTH[threads] = nbytes / best
    return _BANDWIDTH[threads]


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's native side prints a line on every start and stop: keep them off the user's stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass
class DecodeProfile:
    """One rank's decode step, averaged over the measured steps of a prompt."""

    rank: int
    program: str  # "native" or "eager": what ran the steps
    step_s: float
    weight_bytes: int
    bandwidth: float
    kernels_s: float
    collectives_s: float
    collective_calls: float

    @property
    def in_collectives_s(self) -> float:
        """Collective time, at most the step."""
        return min(self.collectives_s, self.step_s)

    @property
    def in_kernels_s(self) -> float:
        """Kernel time, at most what the step leaves beside its collectives: it comes from profiled steps,
        which run slower than plain ones, and on a busy host one of them can be slower still."""
        return min(self.kernels_s, self.step_s - self.in_collectives_s)

    @property
    def weights_s(self) -> float:
        return min(self.weight_bytes / self.bandwidth, self.in_kernels_s) if self.bandwidth else 0.0

    @property
    def beyond_s(self) -> float:
        """Kernel time beyond streaming the weights."""
        return max(0.0, self.in_kernels_s - self.weights_s)

    @property
    def host_s(self) -> float:
        return max(0.0, self.step_s - self.in_kernels_s - self.in_collectives_s)

    def line(self) -> str:
        """The one line ``tprun --profile`` prints for this rank."""
        ms = 1e3
        return (
            f"profile rank {self.rank} ({self.program} program): decode step {self.step_s * ms:.2f} ms = "
            f"weights {self.weights_s * ms:.2f} ms ({self.weight_bytes / 2**20:.0f} MiB at "
            f"{self.bandwidth / 1e9:.1f} GB/s) + kernels {self.beyond_s * ms:.2f} ms + collectives "
            f"{self.in_collectives_s * ms:.2f} ms ({self.collective_calls:.0f} calls) + host "
            f"{self.host_s * ms:.2f} ms ({self.host_s / (self.step_s or 1.0):.0%} of the step)"
        )


@dataclass
class StepProfiler:
    """Runs the decode steps of one prompt: plain ones (timed) and every other one of the first few
    profiled (kernel times)."""

    rank: int
    program: str
    weight_bytes: int
    profiled_steps: int = 4
    plain: list[float] = field(default_factory=list)
    plain_collectives: list[tuple[float, int]] = field(default_factory=list)
    kernels: list[float] = field(default_factory=list)
    profiled_collectives: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Start and stop the profiler once before any step: its first start imports torch._dynamo
        (~1.4 s), which would otherwise land in the generation's decode time."""
        prof = profile(activities=[ProfilerActivity.CPU])
        with _stderr_silenced():
            prof.start()
            prof.stop()

    def run(self, step: Callable[[], T]) -> T:
        """Run one decode step, plain or profiled (the first step, which warms caches up, is plain)."""
        if self.plain and len(self.kernels) < self.profiled_steps and len(self.plain) % 2 == 1:
            return self._profiled(step)
        before = _clock()
        started = time.perf_counter()
        result = step()
        self.plain.append(time.perf_counter() - started)
        after = _clock()
        if before is not None and after is not None:
            self.plain_collectives.append((after[0] - before[0], after[1] - before[1]))
        return result

    def _profiled(self, step: Callable[[], T]) -> T:
        prof = profile(activities=[ProfilerActivity.CPU])
        with _stderr_silenced():
            prof.start()
        try:
            result = step()
        finally:
            with _stderr_silenced():
                prof.stop()
        kernels = collectives = 0.0
        calls = 0
        for event in prof.events():
            if event.cpu_parent is not None:
                continue  # only top-level events: nested ones are inside them
            seconds = event.cpu_time_total / 1e6
            if any(mark in event.name for mark in _COLLECTIVE_MARKS):
                collectives += seconds
                calls += 1
            else:
                kernels += seconds
        self.kernels.append(kernels)
        self.profiled_collectives.append((collectives, calls))
        return result

    def result(self) -> DecodeProfile | None:
        """The averaged profile, or None when the prompt had too few decode steps to measure."""
        plain = self.plain[1:] or self.plain
        if not plain or not self.kernels:
            return None
        measured = self.plain_collectives[1:] or self.plain_collectives or self.profiled_collectives
        return DecodeProfile(
            self.rank,
            self.program,
            sum(plain) / len(plain),
            self.weight_bytes,
            read_bandwidth(),
            sum(self.kernels) / len(self.kernels),
            sum(s for s, _ in measured) / len(measured),
            sum(n for _, n in measured) / len(measured),
        )
