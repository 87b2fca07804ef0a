"""Benchmark: the decode matrix-vector products of SmolLM2-135M, and decode attention, on one thread, per ISA.

A decode step reads every weight once, so its products should run at the host's memory bandwidth. This
measures, on one thread (a rank per core), the weights of one decode step of a rank -- 30 layers of
q, k, v, o, gate, up, down and the (vocabulary-split) lm_head, as separate tensors so nothing stays in
cache -- read by ``tpcompile::streaming_linear`` (the C++ kernel, ``runtime/kernels/cpu_ops.cpp``) and by
``F.linear`` (BLAS), and a plain ``sum`` over the same bytes as the bandwidth reference. The kernel is
built twice: for this host (``-march=native``: AVX-512 where the host has it) and for AVX2 + FMA only
(``TPCOMPILE_CPU_ISA=x86-64-v3``, the code path of an AVX2-only host; the memory system stays this one's).

Decode attention: one query row per head over a KV cache of 512 to 4096 positions, through
``tpcompile::prefix_attention`` (the direct loop of a decode step, ``cpu_ops.cpp``) and through
``F.scaled_dot_product_attention`` (torch's flash kernel, what an eager program runs), for a group of query
heads sharing one KV head as in a SmolLM2 rank and for a Llama-3-8B rank at tp=4 (8 heads, 2 KV heads,
head size 128), with the boolean mask a program passes (every cached position open).

    .venv/bin/python bench/gemv.py [--repeats 20]

Not a test: the numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from llm import host_line  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS, HEAD = 576, 1536, 49152, 30, 64
#: (name, heads, kv heads, intermediate, vocabulary) of one rank's share
RANKS = {"tp=1": (9, 3, INTER, VOCAB), "tp=2 rank 0": (6, 2, INTER // 2, VOCAB // 2)}
ISAS = {"native": "this host (-march=native)", "x86-64-v3": "AVX2 + FMA only (-march=x86-64-v3)"}
TAG = "GEMV_JSON "
#: (name, query heads, KV heads, head size) of one attention call
ATTENTION = {"SmolLM2 rank: 3 heads on 1 KV head": (3, 1, HEAD), "Llama-3-8B rank at tp=4": (8, 2, 128)}
CONTEXTS = (512, 2048, 4096)
KERNELS = ("C++ kernel", "SDPA")


def shapes(heads: int, kv: int, inter: int, vocab: int) -> list[tuple[int, int]]:
    """``[out, in]`` of every product of one decode step of a rank."""
    layer = [(heads * HEAD, HIDDEN), (kv * HEAD, HIDDEN), (kv * HEAD, HIDDEN), (HIDDEN, heads * HEAD)]
    layer += [(inter, HIDDEN), (inter, HIDDEN), (HIDDEN, inter)]
    return layer * LAYERS + [(vocab, HIDDEN)]


def worker(repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from tpcompile.runtime.kernels.cpu_ops import load_cpu_ops

    torch.set_num_threads(1)
    if not load_cpu_ops():
        raise SystemExit("the C++ kernels could not be built")
    op = torch.ops.tpcompile.streaming_linear.default
    results = {}
    for rank, spec in RANKS.items():
        weights = [torch.randn(o, i) for o, i in shapes(*spec)]
        inputs = {i: torch.randn(1, i) for _, i in shapes(*spec)}
        nbytes = sum(w.numel() * 4 for w in weights)
        kernels = {
            "C++ kernel": lambda x, w: op(x, w, None),
            "F.linear (BLAS)": lambda x, w: F.linear(x, w),
            "sum (bandwidth)": lambda x, w: w.sum(),
        }
        for name, kernel in kernels.items():
            best = float("inf")
            for i in range(repeats + 1):  # the first pass warms up
                start = time.perf_counter()
                for w in weights:
                    kernel(inputs[w.shape[1]], w)
                best = min(best, time.perf_counter() - start) if i else best
            results[f"{rank}|{name}"] = (best * 1e3, nbytes / best / 1e9)
    results.update(attention_times(repeats))
    print(TAG + json.dumps(results))


def attention_times(repeats: int) -> dict[str, tuple[float, float]]:
    """``"attention|case|context|kernel" -> (microseconds per call, 0)``: best of ``10 * repeats`` calls."""
    import torch
    import torch.nn.functional as F

    attend = torch.ops.tpcompile.prefix_attention.default
    results = {}
    for case, (heads, kv_heads, dim) in ATTENTION.items():
        for context in CONTEXTS:
            q = torch.randn(1, heads, 1, dim)
            k, v = torch.randn(2, 1, kv_heads, context, dim)
            mask = torch.ones(1, 1, 1, context, dtype=torch.bool)
            kernels = {
                "C++ kernel": functools.partial(attend, q, k, v, mask, 0.0, False, None, True),
                "SDPA": functools.partial(F.scaled_dot_product_attention, q, k, v, mask, enable_gqa=True),
            }
            for name, kernel in kernels.items():
                kernel()
                best = float("inf")
                for _ in range(10 * repeats):
                    start = time.perf_counter()
                    kernel()
                    best = min(best, time.perf_counter() - start)
                results[f"attention|{case}|{context}|{name}"] = (best * 1e6, 0.0)
    return results


def measure(isa: str, repeats: int) -> dict[str, tuple[float, float]]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TPCOMPILE_CACHE"] = tempfile.mkdtemp(prefix="tpcompile-gemv-")  # a fresh build per ISA
    if isa != "native":
        env["TPCOMPILE_CPU_ISA"] = isa
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)), None)
    if line is None:
        raise SystemExit(f"worker failed ({isa}): {proc.stderr.strip()[-500:]}")
    data: dict[str, tuple[float, float]] = json.loads(line[len(TAG) :])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.repeats)
    print(f"{datetime.date.today().isoformat()}; {host_line()}", file=sys.stderr)
    results = {isa: measure(isa, args.repeats) for isa in ISAS}
    print(f"{datetime.date.today().isoformat()}; {host_line()}")
    print("one thread, fp32, one activation row; ms per decode step's products (GB/s of weights read)\n")
    kernels = ["C++ kernel", "F.linear (BLAS)", "sum (bandwidth)"]
    print("| kernels built for | rank | " + " | ".join(kernels) + " |")
    print("|---|---|" + "---|" * len(kernels))
    for isa, label in ISAS.items():
        for rank in RANKS:
            cells = [f"{ms:.1f} ({gbs:.1f})" for ms, gbs in (results[isa][f"{rank}|{k}"] for k in kernels)]
            print(f"| {label} | {rank} | " + " | ".join(cells) + " |")
    print("\none thread, fp32, one query row per head; microseconds per attention call, C++ kernel / SDPA\n")
    print("| kernels built for | call | " + " | ".join(f"{c} positions" for c in CONTEXTS) + " |")
    print("|---|---|" + "---|" * len(CONTEXTS))
    for isa, label in ISAS.items():
        for case in ATTENTION:
            cells = []
            for context in CONTEXTS:
                ours, sdpa = (results[isa][f"attention|{case}|{context}|{kernel}"][0] for kernel in KERNELS)
                cells.append(f"{ours:.0f} / {sdpa:.0f}")
            print(f"| {label} | {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
