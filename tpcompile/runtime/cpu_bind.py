"""Pinning each local rank to cores of its own (``tprun --cpu-bind auto|none``), as vLLM and SGLang do on CPU
servers.

The launcher splits the CPUs it may use (its own affinity mask, so a ``taskset`` or cgroup cpuset around
``tprun`` is respected) into one set per local rank and hands rank r its set in ``TPRUN_CPUS``; the rank
applies it with ``os.sched_setaffinity`` before it imports torch (:func:`bind_from_env`), so every thread
torch, OpenMP and BLAS start later inherits it.  Under torchrun each rank computes the same split from
``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` and takes its own part (:func:`bind_local_rank`).

Invariants:
- ranks never share a CPU: ``auto`` pins only when every rank gets at least one CPU of its own (and, when
  ``OMP_NUM_THREADS`` is set, that many); a layout that does not fit is left to the OS scheduler;
- with several NUMA nodes the ranks are spread over the nodes (one rank per node when there are as many
  ranks as nodes) and no rank's CPUs span two nodes;
- on one node, a rank gets whole physical cores (all their hardware threads) whenever there are at least
  as many cores as ranks on it, and every rank gets as many CPUs as the others;
- standard library only: a spawned rank calls this before importing anything heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CPU_BIND_MODES",
    "CPUS_ENV",
    "Topology",
    "bind_from_env",
    "bind_local_rank",
    "parse_cpu_list",
    "plan_cpu_sets",
    "rank_cpu_sets",
    "rank_threads",
    "read_topology",
]

CPU_BIND_MODES = ("auto", "none")
#: The CPUs (``0,1,2``) a spawned rank pins itself to; set by the launcher, or by the rank under torchrun.
CPUS_ENV = "TPRUN_CPUS"
_SYS = Path("/sys/devices/system")


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` (the kernel's cpulist format) -> ``[0, 1, 2, 3, 8, 10, 11]``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


@dataclass(frozen=True)
class Topology:
    """The CPUs this process may use, as NUMA nodes of physical cores of logical CPUs (all non-empty)."""

    nodes: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def cpus(self) -> list[int]:
        return sorted(c for node in self.nodes for core in node for c in core)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_topology(allowed: Sequence[int] | None = None, sys_dir: Path = _SYS) -> Topology:
    """This machine's NUMA nodes and cores (``/sys/devices/system``), restricted to ``allowed`` (default:
    this process's affinity mask).  Without that information every CPU is its own core on one node."""
    mine = set(os.sched_getaffinity(0) if allowed is None else allowed)
    nodes: list[list[int]] = []
    for path in sorted(sys_dir.glob("node/node[0-9]*"), key=lambda p: int(p.name[4:])):
        text = _read(path / "cpulist")
        if text is not None:
            nodes.append([c for c in parse_cpu_list(text) if c in mine])
    placed = {c for node in nodes for c in node}
    nodes.append(sorted(mine - placed))  # CPUs no node lists (no NUMA information): one more node
    result = []
    for node in nodes:
        cores: dict[tuple[int, ...], list[int]] = {}
        for cpu in node:
            text = _read(sys_dir / f"cpu/cpu{cpu}/topology/thread_siblings_list")
            key = tuple(parse_cpu_list(text)) if text is not None else (cpu,)
            cores.setdefault(key, []).append(cpu)
        if cores:
            result.append(tuple(sorted(tuple(c) for c in cores.values())))
    return Topology(tuple(result))


def _split(units: Sequence[Sequence[int]], parts: int, size: int) -> list[tuple[int, ...]]:
    """``parts`` consecutive runs of ``size`` units each, flattened to CPU ids."""
    return [tuple(c for unit in units[i * size : (i + 1) * size] for c in unit) for i in range(parts)]


CpuSets = list[tuple[int, ...]]


def plan_cpu_sets(topology: Topology, nranks: int, threads: int | None = None) -> CpuSets | None:
    """One CPU set per local rank (see the module invariants), or None when the ranks do not fit."""
    nodes = topology.nodes
    if nranks < 1 or not nodes:
        return None
    on_node = [r * len(nodes) // nranks for r in range(nranks)]  # consecutive ranks share a node
    per_node = [on_node.count(i) for i in range(len(nodes))]
    whole_cores = all(len(node) >= k for node, k in zip(nodes, per_node, strict=True))
    units = [node if whole_cores else tuple((c,) for core in node for c in core) for node in nodes]
    sizes = [len(u) // k for u, k in zip(units, per_node, strict=True) if k]
    if min(sizes) == 0:
        return None
    size = min(sizes)  # equal shares: the ranks wait for each other at every collective
    sets: CpuSets = []
    for node_units, k in zip(units, per_node, strict=True):
        sets.extend(_split(node_units, k, size))
    if threads is not None and min(len(s) for s in sets) < threads:
        return None
    return sets


def _omp_threads(environ: Mapping[str, str]) -> int | None:
    raw = environ.get("OMP_NUM_THREADS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def rank_cpu_sets(mode: str, nranks: int, environ: Mapping[str, str] | None = None) -> CpuSets | None:
    """The launcher's plan for ``nranks`` local ranks under ``--cpu-bind mode`` (None: no pinning)."""
    if mode not in CPU_BIND_MODES:
        raise ValueError(f"unknown --cpu-bind mode {mode!r}; choose one of {', '.join(CPU_BIND_MODES)}")
    if mode == "none":
        return None
    return plan_cpu_sets(read_topology(), nranks, _omp_threads(os.environ if environ is None else environ))


def _pin(cpus: Sequence[int], environ: MutableMapping[str, str]) -> bool:
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError):  # a CPU that went offline, or a tighter mask than the launcher's
        environ.pop(CPUS_ENV, None)
        return False
    environ[CPUS_ENV] = ",".join(map(str, cpus))
    return True


def bind_from_env(environ: MutableMapping[str, str] | None = None) -> bool:
    """In a spawned rank: pin this process to the CPUs in ``TPRUN_CPUS``, if set; True if pinned."""
    env = os.environ if environ is None else environ
    raw = env.get(CPUS_ENV, "")
    if not re.fullmatch(r"\d+(,\d+)*", raw):
        env.pop(CPUS_ENV, None)
        return False
    return _pin(parse_cpu_list(raw), env)


def bind_local_rank(mode: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """In a process that knows its ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (torchrun sets both): pin it to
    its part of the split of its CPUs under ``--cpu-bind mode``; True if pinned.  Call it before torch
    starts threads."""
    env = os.environ if environ is None else environ
    rank, world = env.get("LOCAL_RANK", ""), env.get("LOCAL_WORLD_SIZE", "")
    if not (rank.isdigit() and world.isdigit()) or int(rank) >= int(world):
        return False
    sets = rank_cpu_sets(mode, int(world), {})  # torchrun sets OMP_NUM_THREADS=1 on its own: not a choice
    return sets is not None and _pin(sets[int(rank)], env)


def rank_threads(local_world_size: int, environ: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for a CPU rank: one per CPU of its own when pinned, else an equal share of the
    CPUs this process may use."""
    env = os.environ if environ is None else environ
    allowed = len(os.sched_getaffinity(0))
    if env.get(CPUS_ENV):
        return allowed
    return max(1, allowed // max(1, local_world_size))
