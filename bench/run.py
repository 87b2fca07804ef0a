"""Benchmark: the example GPT compiled at tp = 1, 2 and run on real gloo processes (CPU).

Prints a markdown table: forward latency at a fixed sequence length, peak RSS per rank, weight bytes per
rank, and the eager model with the same total threads for comparison. Not a test: numbers vary by machine.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import gpt  # noqa: E402

CONFIG = gpt.GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=6, n_embd=384)
SEQ, WARMUP, ITERS = 128, 3, 20
CORES = os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, tp: int, artifact: str, port: int, results: dict[int, tuple[float, float]]) -> None:
    from tpcompile.runtime import load_rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp))
    torch.set_num_threads(max(1, CORES // tp))
    dist.init_process_group("gloo")
    program = load_rank(artifact, rank)
    idx = torch.randint(0, CONFIG.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    for _ in range(WARMUP):
        program(idx)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(ITERS):
        program(idx)
    elapsed = (time.perf_counter() - start) / ITERS
    results[rank] = (elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    dist.destroy_process_group()


def _eager() -> float:
    torch.set_num_threads(CORES)
    model = gpt.build_model(CONFIG)
    idx = torch.randint(0, CONFIG.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(WARMUP):
            model(idx)
        start = time.perf_counter()
        for _ in range(ITERS):
            model(idx)
    return (time.perf_counter() - start) / ITERS


def _build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, dict[int, object]]]:
    return gpt.build_model(CONFIG), gpt.example_inputs(CONFIG, seq=16), gpt.dynamic_shapes(CONFIG)


def main() -> None:
    from tpcompile.compiler import compile_model
    from tpcompile.frontend.capture import captured_program

    model, args, dynamic = _build()
    program = torch.export.export(model, args, dynamic_shapes=dynamic)
    rows = [f"| eager (transformers-free PyTorch) | {CORES} | {_eager() * 1e3:.1f} | - | - |"]
    with tempfile.TemporaryDirectory() as tmp:
        for tp in (1, 2):
            out = Path(tmp) / f"tp{tp}"
            start = time.perf_counter()
            result = compile_model(captured_program(program, "gpt-bench"), tp, out)
            compile_s = time.perf_counter() - start
            results = mp.Manager().dict()
            mp.spawn(_rank_main, args=(tp, str(out), _free_port(), results), nprocs=tp, join=True)
            latency = max(v[0] for v in results.values())
            rss = max(v[1] for v in results.values())
            share = max(r.weight_bytes for r in result.manifest.ranks) / result.manifest.total_weight_bytes
            rows.append(f"| tpcompile tp={tp} (compile {compile_s:.1f} s) | {max(1, CORES // tp)} x {tp} | "
                        f"{latency * 1e3:.1f} | {rss:.0f} | {share:.2f} |")
    print(f"example GPT {CONFIG}, forward of 1 x {SEQ} tokens, mean of {ITERS}\n")
    print("| run | threads | ms / forward | peak RSS per rank (MiB) | weight share per rank |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
