"""What one calibration rank measures, each the way a decode step meets it.

- **bandwidth**: matrix-vector products over a set of weight matrices larger than the rank's share of
  the caches, through the same path a decode step takes (``kernels.streaming_linear.decode_linear``: the
  streaming kernel at one thread, BLAS otherwise); the best of several passes;
- **FLOP/s**: a ``[256, 2048] x [2048, 2048]`` product (prefill-like);
- **op overhead**: a generated ``torch.fx`` program of small ops on a hidden-sized row, run like a rank's
  eager program: its time per op;
- **collectives**: all-reduces of a decode-sized value (latency) and of 1 MiB (bandwidth) over the process
  group (gloo TCP) and over the same-host shared-memory transport.

Invariant: every function measures in this process only, with the torch threads it was given, and
returns plain numbers (seconds, bytes/s, FLOP/s); the ranks run them at the same time so that they share
the host as tprun's ranks do.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.fx as fx

from ..kernels.streaming_linear import decode_linear, kernel_available

aten = torch.ops.aten
HIDDEN = 576  # a decode row of a small model; any few-KiB row behaves the same


def _typical(fn: Callable[[], object], repeats: int) -> float:
    """The mean time of ``repeats`` calls: what the host gives now, stalls included (a decode's tokens/s
    is a mean over its steps, on a shared machine with the other jobs' share taken out)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s a decode step's products read weights at (see the module docstring)."""
    kernel_available()  # build / load the streaming kernel before timing
    rows, cols = 1536, HIDDEN
    count = max(1, nbytes // (rows * cols * 4))
    weights = [torch.randn(rows, cols) for _ in range(count)]
    x = torch.randn(1, cols)

    def sweep() -> None:
        for w in weights:
            decode_linear(x, w)

    sweep()
    return count * rows * cols * 4 / _typical(sweep, repeats)


def flops(repeats: int = 3) -> float:
    a, b = torch.randn(256, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 256 * 2048 * 2048 / _typical(lambda: torch.mm(a, b), repeats)


def _small_ops_program(n: int) -> fx.GraphModule:
    """About ``n`` small ops on one row, in the mix of a decoder layer's (elementwise, views, reductions)."""
    graph = fx.Graph()
    value = graph.placeholder("x")
    w = graph.placeholder("w")
    for _ in range(n // 5):
        value = graph.call_function(aten.mul.Tensor, (value, w))
        value = graph.call_function(aten.add.Tensor, (value, w))
        value = graph.call_function(aten.view.default, (value, [1, 1, HIDDEN]))
        mean = graph.call_function(aten.mean.dim, (value, [-1], True))
        value = graph.call_function(aten.sub.Tensor, (value, mean))
    graph.output(value)
    return fx.GraphModule(torch.nn.Module(), graph)


def op_overhead(n: int = 2000, repeats: int = 5) -> float:
    """Seconds per op of a rank's eager program (host-bound small ops)."""
    program = _small_ops_program(n)
    ops = sum(1 for node in program.graph.nodes if node.op == "call_function")
    x, w = torch.randn(1, 1, HIDDEN), torch.ones(HIDDEN)
    with torch.inference_mode():
        program(x, w)
        return _typical(lambda: program(x, w), repeats) / ops


def all_reduce_times(
    reduce: Callable[[torch.Tensor], object], small: int, large: int, repeats: int = 200
) -> tuple[float, float]:
    """(seconds of one all-reduce of ``small`` bytes, of ``large`` bytes): means, after a warm-up of a
    few calls."""
    out = []
    for nbytes, n in ((small, repeats), (large, max(10, repeats // 10))):
        t = torch.ones(nbytes // 4)
        for _ in range(5):
            reduce(t)
        out.append(_typical(functools.partial(reduce, t), n))
    return out[0], out[1]


def gloo_all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t)
