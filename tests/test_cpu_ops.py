"""The C++ CPU kernels of the custom ops (tpcompile/runtime/kernels/cpu_ops.cpp): equal to the Python ones,
interoperating with the Python shared-memory transport on one segment, and failing in one line when a
peer dies or times out."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.processes import assert_same_bits_as_avx2_build, compares_with_avx2_build
from tpcompile.runtime.kernels.cpu_ops import load_cpu_ops
from tpcompile.runtime.launch.launcher import free_port
from tpcompile.runtime.reporting import report_exception

if not load_cpu_ops():  # the C++ compiler is part of this machine kind: a failed build is a test failure
    raise RuntimeError("the C++ kernels did not build here; rerun with TPCOMPILE_CPU_KERNELS unset")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("out", "inp"), [(576, 576), (1537, 576), (1031, 80), (7, 33), (4099, 100)])
def test_streaming_linear_equals_f_linear(threads: int, out: int, inp: int) -> None:
    torch.set_num_threads(threads)
    try:
        weight, bias = torch.randn(out, inp), torch.randn(out)
        for rows in (1, 3, 8):
            x = torch.randn(2, rows, inp)[1]
            for b in (None, bias):
                got = torch.ops.tpcompile.streaming_linear(x, weight, b)
                torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-4)
                # a row's result does not depend on the rows beside it (batched decode == one by one)
                alone = [torch.ops.tpcompile.streaming_linear(x[m : m + 1], weight, b) for m in range(rows)]
                assert torch.equal(got, torch.cat(alone))
        many = torch.randn(9, inp)  # a prompt: BLAS's result, exactly
        assert torch.equal(
            torch.ops.tpcompile.streaming_linear(many, weight, bias), F.linear(many, weight, bias)
        )
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))


def kernel_outputs() -> list[torch.Tensor]:
    """Decode products and attention of fixed seeded inputs, as this process's kernels give them."""
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for out, inp in [(1031, 576), (67, 80), (40, 100)]:
        weight, bias = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
        for rows in (1, 3):
            x = torch.randn(rows, inp, generator=gen)
            outputs.append(torch.ops.tpcompile.streaming_linear(x, weight, bias))
    for dim in (64, 20):  # registers; the generic loop with a scalar tail
        q = torch.randn(1, 9, 1, dim, generator=gen)
        k, v = torch.randn(2, 1, 3, 40, dim, generator=gen)
        mask = torch.rand(1, 1, 1, 40, generator=gen) > 0.3
        outputs.append(torch.ops.tpcompile.prefix_attention(q, k, v, mask, 0.0, False, None, True))
    return outputs


@compares_with_avx2_build
def test_kernels_give_the_same_bits_when_built_for_avx2(tmp_path: Path, one_thread: None) -> None:
    """vector_math.h's invariant: one order of fp32 sums on every host, whatever registers an ISA holds
    the lanes in (one 64-byte vector with AVX-512, two 32-byte ones with AVX2) and however the compiler
    treats a scalar tail."""
    assert_same_bits_as_avx2_build("tests.test_cpu_ops:kernel_outputs", tmp_path)


def test_streaming_linear_rounds_differently_from_blas() -> None:
    """The kernel really runs (a fallback to BLAS would be bit-identical to it)."""
    x, weight = torch.randn(1, 1000), torch.randn(512, 1000)
    assert not torch.equal(torch.ops.tpcompile.streaming_linear(x, weight, None), F.linear(x, weight))


@pytest.mark.parametrize("queries", [1, 5, 9])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "dim"), [(1, 4, 2, 16), (2, 3, 3, 20), (1, 9, 3, 64)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefix_attention_equals_full_attention(
    queries: int, batch: int, heads: int, kv_heads: int, dim: int, threads: int
) -> None:
    """Decode-sized queries (<= 8) run the direct loop, longer ones SDPA: both equal SDPA over the open keys,
    for boolean and additive masks, shared by every head or per head, with and without GQA, values as
    wide as the keys or wider."""
    torch.set_num_threads(threads)
    try:
        q = torch.randn(batch, heads, queries, dim)
        k = torch.randn(batch, kv_heads, 40, dim)
        for v, mask_heads in itertools.product(
            (torch.randn(batch, kv_heads, 40, dim), torch.randn(batch, kv_heads, 40, dim + 3)), (1, heads)
        ):  # value rows as wide as the keys (in registers when 16 | dim) or wider (the generic loop)
            open_ = torch.rand(batch, mask_heads, queries, 40) < 0.7
            open_[..., 0] = True
            open_[..., 9:] = False
            k[..., 9:, :] = float("nan")  # stale cache slots past the written ones are never read
            additive = torch.zeros(open_.shape).masked_fill(~open_, float("-inf"))
            for mask in (open_, additive):
                got = torch.ops.tpcompile.prefix_attention(q, k, v, mask, 0.0, False, 0.3, True)
                want = F.scaled_dot_product_attention(
                    q, k[..., :9, :], v[..., :9, :], mask[..., :9], scale=0.3, enable_gqa=True
                )
                assert got.is_contiguous()  # what compiled code reads it as
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 64), (6, 3, 128), (3, 1, 16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_prefix_attention_over_many_key_tiles_equals_sdpa(
    heads: int, kv_heads: int, dim: int, threads: int
) -> None:
    """A cache long enough for many tiles of 16 keys, the last one partial, closed keys inside it holding
    NaN, the query heads of a GQA group split between tasks or not: SDPA over the open keys."""
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(heads * dim)
        q = torch.randn(1, heads, 1, dim, generator=gen) * 4  # scores spread wide: exp over a large range
        k, v = torch.randn(2, 1, kv_heads, 160, dim, generator=gen)
        open_ = torch.rand(1, heads, 1, 160, generator=gen) < 0.8
        open_[..., 0] = True
        open_[..., 117:] = False
        k[..., 117:, :] = float("nan")
        k[..., 5, :] = v[..., 5, :] = float("nan")  # a closed slot that is read but must not count
        open_[..., 5] = False
        got = torch.ops.tpcompile.prefix_attention(q, k, v, open_, 0.0, False, None, True)
        want = F.scaled_dot_product_attention(
            q, k[..., :117, :].nan_to_num(), v[..., :117, :].nan_to_num(), open_[..., :117], enable_gqa=True
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))


def test_prefix_attention_row_without_open_key_is_sdpas() -> None:
    q, k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    mask = torch.ones(1, 1, 2, 12, dtype=torch.bool)
    mask[..., 1, :] = False  # the second query sees nothing
    got = torch.ops.tpcompile.prefix_attention(q, k, v, mask, 0.0, False, None, False)
    want = F.scaled_dot_product_attention(q, k, v, torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(got, want, equal_nan=True)


def _rank(rank: int, world: int, port: int, scenario: str, result: Any) -> None:
    import torch.distributed as dist

    from tpcompile.runtime.kernels.compiled import bind_transport
    from tpcompile.runtime.transport.shm import ShmCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    assert load_cpu_ops()
    comm = ShmCommunicator.create(rank, world, timeout_s=2.0)
    bind_transport(dist.group.WORLD.group_name, world, comm)
    if scenario == "mix":
        for i in range(60):  # C++ and Python calls alternate on one segment; sums in rank order
            t = torch.randn(5, 7, generator=torch.Generator().manual_seed(rank * 1000 + i))
            parts = [
                torch.randn(5, 7, generator=torch.Generator().manual_seed(r * 1000 + i)) for r in range(world)
            ]
            want = parts[0] + parts[1]
            for p in parts[2:]:
                want += p
            got = torch.ops.tpcompile.all_reduce_sum(t) if i % 3 else comm.all_reduce(t)
            assert torch.equal(got, want), i
            gathered = torch.ops.tpcompile.all_gather(t, world) if i % 2 else comm.all_gather(t)
            assert torch.equal(gathered, torch.cat(parts, 0)), i
        big = torch.ones(3 * 2**20)  # larger than a slot: through the process group
        assert torch.equal(torch.ops.tpcompile.all_reduce_sum(big), big * world)
        result[rank] = "ok"
    elif rank == 0:  # "dead": rank 1 dies without joining; "stuck": rank 1 never calls
        try:
            torch.ops.tpcompile.all_reduce_sum(torch.ones(4))
            result[0] = "returned"
        except RuntimeError as exc:
            result[0] = str(exc).splitlines()[0]
    elif scenario == "dead":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        time.sleep(6)
    if scenario != "mix":
        os._exit(0)  # the peer is gone: nothing to tear down with it
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_cpp_collectives_interoperate_with_the_python_transport(world: int) -> None:
    result = mp.Manager().dict()
    mp.spawn(_rank, args=(world, free_port(), "mix", result), nprocs=world)
    assert dict(result) == dict.fromkeys(range(world), "ok")


@pytest.mark.parametrize("scenario", ["dead", "stuck"])
def test_a_cpp_collective_fails_in_one_line_when_a_peer_is_gone_or_stuck(scenario: str, capsys: Any) -> None:
    result = mp.Manager().dict()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, scenario, result)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    message = result.get(0, "")
    if scenario == "dead":
        assert message.startswith("tpcompile collective: rank 1 (pid ") and message.endswith(
            "exited during a collective"
        ), message
    else:
        assert message == (
            "tpcompile collective: collective timed out after 2 s waiting for rank 1 "
            "(raise --timeout if a rank is legitimately this slow)"
        )
    assert report_exception(RuntimeError(message)) == 1  # printed as the transport's own one line
    assert capsys.readouterr().err == f"tprun: error: {message.removeprefix('tpcompile collective: ')}\n"
    assert not list(Path("/dev/shm").glob(f"tpcompile-{procs[0].pid}-*"))
