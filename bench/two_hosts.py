"""Two "hosts" on one machine: two network namespaces joined by a link with a one-way delay, each running
one `tprun --nnodes 2` (one rank, pinned to a core of its own, gloo over the link).

    sudo python bench/two_hosts.py ARTIFACT [--delays-ms 0,0.5,2] [--new-tokens 64] [--profile host-gloo]
        [--link auto|netem|tun]

The link is a veth pair with `tc netem delay` on both ends where the kernel has the netem qdisc; where it
does not (`--link auto` probes), a TUN device in each namespace with `bench/delay_link.py` forwarding the
packets after the delay (the same one-way delay, in user space).

For each delay it runs SmolLM2 (or any causal-LM artifact at tp=2) across the two namespaces, checks
that the greedy tokens equal a one-host run of the same artifact, and compares the measured decode
tokens/s with the cost model's prediction for that delay: the `host-gloo` profile measured by `tprun
calibrate` (per-rank numbers of 2 ranks sharing this machine), with the network cost of a collective
from probing the link with gloo all-reduces at 0 ms and at `--reference-ms` (1 ms): its latency and
bandwidth at 0 ms, and how many one-way crossings in sequence an all-reduce makes (the latency's growth per
ms of delay: 2 for a 2-rank ring if every message left at once, more when a transport handshakes); the
prediction at each delay adds that many delays to the latency.

Bounded and tidy: namespaces `tpc2h-a` / `tpc2h-b`, addresses 10.231.77.1-2 on the link devices only,
every run under a timeout, and everything removed at the end (also after an error or Ctrl-C).
Needs root, `ip` and `tc` (iproute2); says so and exits 2 without them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NS = ("tpc2h-a", "tpc2h-b")
VETH = ("tpc2h-va", "tpc2h-vb")
ADDR = ("10.231.77.1", "10.231.77.2")
PORT = 29631
PROMPT = "Write a short story about a robot who learns to paint. Describe its first painting in detail."
SUMMARY = re.compile(
    r"prompt tokens: (\d+) \| new tokens: (\d+) \| time to first token: ([\d.]+) s \| decode: ([\d.]+)"
)


def missing_requirements() -> str | None:
    """Why the simulation cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "taskset"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def teardown() -> None:
    for ns in NS:
        _sh("ip", "netns", "del", ns, check=False)  # deleting a namespace deletes its veth end


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    """The two namespaces (loopback up), removed on exit whatever happens."""
    teardown()  # leftovers of a killed run
    try:
        for ns in NS:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        teardown()


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (probed on a namespace's loopback)."""
    probe = _sh(
        "ip",
        "netns",
        "exec",
        NS[0],
        "tc",
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "netem",
        "delay",
        "0ms",
        check=False,
    )
    _sh("ip", "netns", "exec", NS[0], "tc", "qdisc", "del", "dev", "lo", "root", check=False)
    return probe.returncode == 0


@contextlib.contextmanager
def veth_netem(delay_ms: float) -> Iterator[tuple[str, str]]:
    """A veth pair between the namespaces with `tc netem delay` on both ends; yields the device names."""
    _sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    try:
        for ns, dev, addr in zip(NS, VETH, ADDR, strict=True):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh(
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "netem",
                "delay",
                f"{delay_ms}ms",
            )
        yield VETH
    finally:
        _sh("ip", "-n", NS[0], "link", "del", VETH[0], check=False)


@contextlib.contextmanager
def tun_delay(delay_ms: float) -> Iterator[tuple[str, str]]:
    """A TUN device in each namespace and bench/delay_link.py between them; yields the device names."""
    cmd = [
        sys.executable,
        str(REPO / "bench" / "delay_link.py"),
        NS[0],
        ADDR[0],
        NS[1],
        ADDR[1],
        "--delay-ms",
        str(delay_ms),
        "--dev",
        "tpc2h-t",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"delay link failed: {proc.stderr.read() if proc.stderr else ''}".strip())
        yield ("tpc2h-ta", "tpc2h-tb")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def delayed_link(kind: str, delay_ms: float) -> contextlib.AbstractContextManager[tuple[str, str]]:
    return veth_netem(delay_ms) if kind == "netem" else tun_delay(delay_ms)


def _env(dev: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")


@dataclasses.dataclass
class RunResult:
    new_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    decode_tokens_per_s: float


def _result(stderr: str, tokens: Path) -> RunResult:
    found = SUMMARY.search(stderr)
    if found is None:
        raise RuntimeError(f"no summary line in: {stderr.strip()[-500:]}")
    saved = json.loads(tokens.read_text())
    return RunResult(saved[0]["new_ids"], int(found[1]), int(found[2]), float(found[4]))


def run_across(art: Path, new_tokens: int, devs: tuple[str, str], timeout_s: float = 600) -> RunResult:
    """tp=2 with one rank in each namespace (each pinned to its own core, one thread), gloo on ``devs``."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        procs = []
        for node in (1, 0):
            cmd = [
                "ip",
                "netns",
                "exec",
                NS[node],
                "taskset",
                "-c",
                str(node % (os.cpu_count() or 1)),
                sys.executable,
                "-m",
                "tpcompile.runtime.cli",
                str(art),
                "--prompt",
                PROMPT,
                "--max-new-tokens",
                str(new_tokens),
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--master-addr",
                ADDR[0],
                "--master-port",
                str(PORT),
                "--cpu-bind",
                "none",
                "--timeout",
                "120",
            ]
            if node == 0:
                cmd += ["--save-tokens", str(tokens)]
            procs.append(
                subprocess.Popen(
                    cmd, env=_env(devs[node]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outs = [p.communicate(timeout=timeout_s) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            if p.returncode != 0:
                raise RuntimeError(
                    f"tprun across the namespaces failed ({p.returncode}): {err.strip()[-500:]}"
                )
        return _result(outs[1][1], tokens)


def run_one_host(art: Path, new_tokens: int) -> RunResult:
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        cmd = [
            sys.executable,
            "-m",
            "tpcompile.runtime.cli",
            str(art),
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            str(new_tokens),
            "--save-tokens",
            str(tokens),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"tprun failed: {proc.stderr.strip()[-500:]}")
        return _result(proc.stderr, tokens)


def _probe(rank: int, addr: str) -> None:
    """One side of the link probe: all-reduce times over gloo between the namespaces (printed as JSON)."""
    import torch
    import torch.distributed as dist

    from tpcompile.runtime.calibrate.command import DECODE_BYTES, LARGE_BYTES
    from tpcompile.runtime.calibrate.measure import all_reduce_times, gloo_all_reduce

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(PORT + 1))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    small, large = all_reduce_times(gloo_all_reduce, DECODE_BYTES, LARGE_BYTES, repeats=100)
    dist.destroy_process_group()
    print(json.dumps({"small": small, "large": large}))


def probe_link(devs: tuple[str, str]) -> tuple[float, float]:
    """(all-reduce latency s, bus bandwidth bytes/s) of 2 ranks across the link, as `tprun calibrate` fits
    them (the slower rank's mean times of a decode-sized and a 1 MiB all-reduce)."""
    from tpcompile.runtime.calibrate.command import DECODE_BYTES, LARGE_BYTES

    procs = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                NS[node],
                "taskset",
                "-c",
                str(node % (os.cpu_count() or 1)),
                sys.executable,
                __file__,
                "--probe-rank",
                str(node),
                "--probe-addr",
                ADDR[0],
                "unused",
            ],
            env=_env(devs[node]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"link probe failed: {[o[1].strip()[-300:] for o in outs]}")
    times = [json.loads(o[0]) for o in outs]
    small = max(t["small"] for t in times)
    large = max(t["large"] for t in times)
    slope = max(large - small, 1e-9) / (LARGE_BYTES - DECODE_BYTES)  # factor 2(n-1)/n = 1 at n = 2
    return max(0.0, small - DECODE_BYTES * slope), 1 / slope


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """A collective across the link: ``latency_s + transits x one-way delay + bytes / bandwidth``."""

    latency_s: float
    bandwidth_bytes_s: float
    transits: float  # one-way link crossings in sequence per all-reduce (fitted: ~2 for a 2-rank ring)


def fit_link(kind: str, reference_ms: float) -> LinkModel:
    """Probe the link at 0 ms and at ``reference_ms``: the latency grows by ``transits x delay``."""
    with delayed_link(kind, 0.0) as devs:
        base, bandwidth = probe_link(devs)
    with delayed_link(kind, reference_ms) as devs:
        delayed, _ = probe_link(devs)
    return LinkModel(base, bandwidth, max(0.0, (delayed - base) / (reference_ms / 1e3)))


def predicted(
    art: Path, profile_name: str, link: LinkModel, delay_ms: float, prompt_len: int, new_tokens: int
) -> float:
    from tpcompile.cost.model import predict
    from tpcompile.cost.profiles import load_profile
    from tpcompile.cost.workload import Workload
    from tpcompile.runtime.format.hardware import Link

    host = load_profile(profile_name)
    workload = Workload.from_json(json.loads((art / "manifest.json").read_text())["extra"]["cost"])
    two = dataclasses.replace(
        host,
        name=f"2 namespaces, {delay_ms} ms",
        memory_bandwidth={1: host.bandwidth_per_rank(2)},  # two 1-core "hosts" share this machine
        peak_flops={1: host.flops_per_rank(2)},
        nodes=2,
        max_ranks_per_node=1,  # one rank per namespace
        network=Link(link.latency_s + link.transits * delay_ms / 1e3, link.bandwidth_bytes_s),
    )
    return predict(workload, two, prompt_len, new_tokens).decode_tokens_per_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--delays-ms", default="0,0.5,2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile", default="host-gloo", help="measured by `tprun calibrate --tp 2`")
    ap.add_argument("--link", choices=["auto", "netem", "tun"], default="auto")
    ap.add_argument("--reference-ms", type=float, default=1.0, help="delay the link is probed at (besides 0)")
    ap.add_argument("--probe-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--probe-addr", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_rank is not None:
        _probe(args.probe_rank, args.probe_addr)
        return 0
    why = missing_requirements()
    if why is not None:
        print(f"two_hosts: cannot simulate two hosts here: {why}", file=sys.stderr)
        return 2
    reference = run_one_host(args.artifact, args.new_tokens)
    print(f"one host, tp=2: {reference.decode_tokens_per_s:.1f} tokens/s; load {os.getloadavg()[0]:.2f}")
    print(
        "| one-way delay | greedy tokens = one host | predicted decode (tok/s) | measured decode (tok/s) "
        "| error |"
    )
    print("|---|---|---|---|---|")
    with namespaces():
        kind = args.link
        if kind == "auto":
            kind = "netem" if netem_available() else "tun"
            if kind == "tun":
                print(
                    "(this kernel has no netem qdisc: the delay is applied by bench/delay_link.py "
                    "on a TUN pair)"
                )
        link = fit_link(kind, args.reference_ms)
        print(
            f"link (probed at 0 and {args.reference_ms} ms): all-reduce {link.latency_s * 1e6:.0f} us + "
            f"{link.transits:.2f} x one-way delay + bytes / {link.bandwidth_bytes_s / 1e9:.2f} GB/s"
        )
        for delay in [float(d) for d in args.delays_ms.split(",")]:
            with delayed_link(kind, delay) as devs:
                got = run_across(args.artifact, args.new_tokens, devs)
            same = got.new_ids == reference.new_ids
            pred = predicted(args.artifact, args.profile, link, delay, got.prompt_tokens, got.new_tokens)
            err = pred / got.decode_tokens_per_s - 1
            print(
                f"| {delay} ms ({kind}) | {'yes' if same else 'NO'} ({len(got.new_ids)} tokens) "
                f"| {pred:.1f} | "
                f"{got.decode_tokens_per_s:.1f} | {err:+.0%} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
