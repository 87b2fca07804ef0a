"""``tprun calibrate [--tp N]``: measure this host and write the ``host`` (same-host shared-memory
collectives) and ``host-gloo`` (gloo over TCP) hardware profiles for ``tpcompile plan --profile``.

For every rank count k = 1 .. N, k processes run at once, each pinned to cores // k cores of its own with
as many torch threads (as ``tprun`` runs its ranks), and measure memory bandwidth, FLOP/s and host time
per op (``measure.py``); at k = N they also time all-reduces over gloo and over shared memory. The
profiles keep the per-rank numbers by k (``memory_bandwidth_gbs = {"1" = ..., "2" = ...}``).

Invariant: options are parsed before torch is imported; the profiles are written whole (a temporary file
renamed into place) or not at all; every worker is gone when the command returns.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..reporting import report_exception
from ..usage import OneLineErrors

__all__ = ["calibrate_command"]

DECODE_BYTES = 576 * 4  # one hidden row: what a decode step's all-reduce carries in a small model
LARGE_BYTES = 2**20
WEIGHT_BYTES = 256 * 2**20  # per rank: beyond its share of the caches


class _TprunCalibrate(OneLineErrors, click.Command):
    prog = "tprun calibrate"


def _worker(rank: int, k: int, port: int, queue: Any, collectives: bool, weight_bytes: int) -> None:
    try:
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // k)
        mine = cores[rank * share : (rank + 1) * share] or cores
        os.sched_setaffinity(0, mine)
        import torch

        torch.set_num_threads(len(mine))
        import torch.distributed as dist

        from . import measure

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(k))
        dist.init_process_group("gloo", rank=rank, world_size=k)
        dist.barrier()
        result: dict[str, float] = {"bandwidth": measure.bandwidth(weight_bytes)}
        dist.barrier()
        result["flops"] = measure.flops()
        dist.barrier()
        result["op_overhead"] = measure.op_overhead()
        if collectives and k > 1:
            dist.barrier()
            result["gloo"] = measure.all_reduce_times(measure.gloo_all_reduce, DECODE_BYTES, LARGE_BYTES)  # type: ignore[assignment]
            from ..transport.shm import ShmCommunicator, shm_supported

            if shm_supported(torch.device("cpu")):
                comm = ShmCommunicator.create(rank, k)
                dist.barrier()
                result["shm"] = measure.all_reduce_times(comm.all_reduce, DECODE_BYTES, LARGE_BYTES)  # type: ignore[assignment]
                dist.barrier()
                comm.close()
        dist.destroy_process_group()
        queue.put((rank, result))
    except BaseException as exc:  # noqa: BLE001 (reported by the parent in one line)
        queue.put((rank, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}))


def _run_ranks(k: int, collectives: bool, weight_bytes: int) -> list[dict[str, Any]]:
    import multiprocessing as mp

    from ..launch.launcher import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, k, port, queue, collectives, weight_bytes), daemon=True)
        for r in range(k)
    ]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        while len(results) < k:
            rank, result = queue.get(timeout=600)
            if "error" in result:
                raise click.ClickException(f"calibration rank {rank} failed: {result['error']}")
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(k)]


def _link_from(times: list[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bus bandwidth bytes/s) of an all-reduce from the slowest rank's small and large times:
    ``t = latency + 2(n-1)/n * bytes / bw`` through the two points."""
    small = max(t[0] for t in times)
    large = max(t[1] for t in times)
    n = len(times)
    factor = 2 * (n - 1) / n
    slope = max(large - small, 1e-9) / (LARGE_BYTES - DECODE_BYTES)
    latency = max(0.0, small - factor * DECODE_BYTES * slope)
    return latency, factor / slope


def calibrate(tp: int, out_dir: Path, weight_bytes: int, say: Any) -> list[Path]:
    import platform

    from ..format.hardware import GB, HardwareProfile, Link, profile_to_toml

    cores = len(os.sched_getaffinity(0))
    bandwidth: dict[int, float] = {}
    flops: dict[int, float] = {}
    overhead: list[float] = []
    collective: dict[str, list[tuple[float, float]]] = {}
    for k in range(1, tp + 1):
        say(f"measuring {k} rank(s) at once, {max(1, cores // k)} thread(s) each")
        results = _run_ranks(k, collectives=k == tp, weight_bytes=weight_bytes)
        bandwidth[k] = min(r["bandwidth"] for r in results)
        flops[k] = min(r["flops"] for r in results)
        if k == tp:
            overhead = [r["op_overhead"] for r in results]
            for kind in ("gloo", "shm"):
                if all(kind in r for r in results):
                    collective[kind] = [(r[kind][0], r[kind][1]) for r in results]
    memory = _mem_total() / max(1, cores)
    load = os.getloadavg()
    cpu = _cpu_model()
    comments = [
        f"MEASURED by `tprun calibrate --tp {tp}` on {time.strftime('%Y-%m-%d %H:%M')} UTC: {cpu}, "
        f"{cores} cores ({platform.machine()}), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "memory per rank = RAM / cores; bandwidth and FLOP/s per rank by ranks sharing the host",
    ]
    written = []
    links = {"shm": ("host", "same-host shared-memory"), "gloo": ("host-gloo", "gloo over loopback TCP")}
    if tp == 1:
        collective = {"shm": [(0.0, 1.0)]}
    for kind, (name, what) in links.items():
        if kind not in collective:
            continue
        latency, bus = _link_from(collective[kind]) if tp > 1 else (0.0, 1e12)
        profile = HardwareProfile(
            name=name,
            description=f"this host ({cpu}, {cores} cores), collectives {what}",
            predicted=False,
            memory_bytes=memory,
            memory_bandwidth=bandwidth,
            peak_flops=flops,
            op_overhead_s=max(overhead) if overhead else 0.0,
            max_ranks_per_node=cores,
            link=Link(latency, max(bus, 1.0)),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.toml"
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(profile_to_toml(profile, comments))
        tmp.replace(path)
        written.append(path)
        say(
            f"{name}: {', '.join(f'{k} rank(s) {v / GB:.1f} GB/s' for k, v in sorted(bandwidth.items()))}; "
            f"{profile.op_overhead_s * 1e6:.1f} us/op; all-reduce {latency * 1e6:.0f} us + bytes / "
            f"{bus / GB:.2f} GB/s"
        )
    return written


def _mem_total() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


@click.command(cls=_TprunCalibrate, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tp", type=click.IntRange(min=1), default=2, show_default=True, help="most ranks to measure.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="directory for host.toml / host-gloo.toml "
    "(default: $TPCOMPILE_PROFILES or ~/.cache/tpcompile/profiles).",
)
@click.option(
    "--weight-mib",
    type=click.IntRange(min=8),
    default=WEIGHT_BYTES // 2**20,
    show_default=True,
    help="weights each rank streams when measuring bandwidth.",
)
@click.option("--debug", is_flag=True, help="print full tracebacks.")
def calibrate_command(tp: int, out_dir: Path | None, weight_mib: int, debug: bool) -> None:
    """Measure this host (memory bandwidth, FLOP/s, time per op, all-reduce over gloo and shared memory)
    and write it as the hardware profiles `host` and `host-gloo`."""
    from ..format.hardware import user_profile_dir

    try:
        cores = len(os.sched_getaffinity(0))
        if tp > cores:
            raise click.UsageError(f"--tp {tp} is more ranks than this host's {cores} cores")
        paths = calibrate(
            tp,
            out_dir or user_profile_dir(),
            weight_mib * 2**20,
            lambda m: print(f"tprun: {m}", file=sys.stderr),
        )
        for path in paths:
            click.echo(f"wrote {path}")
    except click.ClickException:
        raise
    except (Exception, KeyboardInterrupt) as exc:
        sys.exit(report_exception(exc, debug=debug))
