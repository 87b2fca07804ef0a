"""Where a rank runs: its device from the environment, the CPU-only decode rewrites left out on any other
device, stalled or failing NCCL ranks ending in one line, ranks pinned to cores of their own, ONNX segment
sessions sharing one arena, and ``make gpu-check`` refusing a machine without CUDA in one line.

There is no GPU here.  Where only the *choice* of a CUDA device is tested, ``torch.cuda.is_available`` /
``device_count`` (and ``set_device``) are mocked; where tensors must live on a device that is not the CPU,
the ``meta`` device stands in for it (it holds shapes but no data, so any host read of a value, like the
cut attention's ``nonzero``, raises).  The tests marked ``device_generic`` run on ``--device`` (cpu in this
suite, cuda under ``examples/gpu_check.py``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.conftest import REPO, cli_env
from tests.processes import children, start, wait_for
from tests.test_lm_runtime_helpers import BOS, EOS, VOCAB, build_lm_artifact, full_weights, reference_generate
from tpcompile.runtime import BackendError, CausalLM, generate_text, load_rank
from tpcompile.runtime.cpu_bind import CPUS_ENV, Topology, plan_cpu_sets, rank_cpu_sets, read_topology
from tpcompile.runtime.errors import CollectiveError
from tpcompile.runtime.kernels import streaming_linear
from tpcompile.runtime.kernels.prefix_attention import prefix_attention, use_prefix_attention
from tpcompile.runtime.kernels.streaming_linear import use_streaming_linear
from tpcompile.runtime.kernels.weight_layout import prefer_column_major_wide_weights
from tpcompile.runtime.launch.launcher import free_port, worker_env
from tpcompile.runtime.reporting import report_exception
from tpcompile.runtime.transport.distributed import (
    backend_failure,
    choose_backend,
    destroy_group,
    init_group,
)
from tpcompile.runtime.transport.watchdog import ProgressWatchdog, same_host_peers

CPU = torch.device("cpu")
HINT = "(raise --timeout if a rank is legitimately this slow)"


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    """Pretend ``count`` GPUs are visible (mocked ``torch.cuda``); returns the devices ``set_device`` got."""
    selected: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append(torch.device(d)))
    return selected


def _local(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))


# --------------------------------------------------------------------------- device per rank


def test_rank_device_comes_from_local_rank_and_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked torch.cuda: ``device_count`` is what ``CUDA_VISIBLE_DEVICES`` leaves visible, from 0."""
    cuda = [torch.device("cuda", i) for i in range(8)]
    _fake_gpus(monkeypatch, 8)
    _local(monkeypatch, 3, 4)
    assert choose_backend(4) == ("nccl", cuda[3])
    _fake_gpus(monkeypatch, 2)  # e.g. CUDA_VISIBLE_DEVICES=4,5: local rank 1 runs on the second, cuda:1
    _local(monkeypatch, 1, 2)
    assert choose_backend(2) == ("nccl", cuda[1])
    _local(monkeypatch, 3, 4)  # fewer GPUs than local ranks: the default stays on CPU
    assert choose_backend(4) == ("gloo", CPU)
    with pytest.raises(BackendError, match="^rank needs cuda:3 but only 2 GPU.s. are visible for 4 local"):
        choose_backend(4, "nccl")
    # an explicit --device cuda lets ranks share GPUs round-robin (gloo, or NCCL if it accepts that)
    assert choose_backend(4, None, "cuda") == ("nccl", cuda[1])
    assert choose_backend(4, "gloo", "cuda") == ("gloo", cuda[1])
    assert choose_backend(4, None, "cuda:0") == ("nccl", cuda[0])
    _fake_gpus(monkeypatch, 1)  # a scheduler gave each rank one GPU of its own, visible as cuda:0
    _local(monkeypatch, 1, 2)
    assert choose_backend(2, None, "cuda") == ("nccl", cuda[0])
    _fake_gpus(monkeypatch, 0)
    assert choose_backend(2) == ("gloo", CPU)
    with pytest.raises(BackendError, match="CUDA was requested but is not available"):
        choose_backend(2, None, "cuda")


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> object:
    """A real one-rank gloo process group (torchrun's environment, as a user's script would have it)."""
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    init_group("gloo", CPU, 60.0)
    yield dist.group.WORLD
    destroy_group()


def test_causal_lm_load_runs_an_nccl_rank_on_cuda_local_rank(
    world_of_one: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under torchrun ``CausalLM.load`` takes the group's device: CPU for gloo (real), and for NCCL
    (mocked backend name and GPUs) ``cuda:LOCAL_RANK``, selected with ``set_device`` before loading."""
    art = build_lm_artifact(tmp_path / "art", [VOCAB], max_seq_len=16, with_tokenizer=False)
    assert CausalLM.load(art).program.device == CPU

    import tpcompile.runtime.lm.generate as generate

    selected = _fake_gpus(monkeypatch, 2)
    _local(monkeypatch, 1, 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    loaded_on: list[torch.device] = []

    def load_rank_spy(artifact: Path, rank: int, device: torch.device, *args: object) -> None:
        loaded_on.append(device)
        raise RuntimeError("stop here: no GPU to load onto")

    monkeypatch.setattr(generate, "load_rank", load_rank_spy)
    with pytest.raises(RuntimeError, match="stop here"):
        CausalLM.load(art)
    assert loaded_on == selected == [torch.device("cuda", 1)]


# --------------------------------------------------------------------------- CPU-only rewrites


class _Attention(nn.Module):
    """A cached attention read with a mask made in the graph, then a wide projection (8 -> 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.register_buffer("keys", torch.randn(1, 2, 16, 8))

    def forward(self, q: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(16, device=q.device)[None, :] < length[:, None]
        return self.proj(F.scaled_dot_product_attention(q, self.keys, self.keys, attn_mask=mask))


def _attention_program() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    inputs = (torch.randn(1, 2, 1, 8), torch.tensor([5]))
    return torch.export.export(_Attention(), inputs).module(), inputs


def _targets(module: nn.Module) -> set[object]:
    return {n.target for g in module.modules() if isinstance(g, torch.fx.GraphModule) for n in g.graph.nodes}


def test_cpu_rewrites_leave_a_program_on_another_device_alone(
    one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program on the meta device (standing in for a GPU) keeps ``aten.linear`` and SDPA, no C kernel is
    built for it even with one torch thread (torchrun's OMP_NUM_THREADS=1), no weight is re-laid out, and
    attention over a non-CPU mask never reads it on the host (meta cannot answer ``nonzero``)."""
    module, (q, length) = _attention_program()
    module.to("meta")

    def no_build() -> bool:
        raise AssertionError("built the CPU kernel for a program that is not on the CPU")

    monkeypatch.setattr(streaming_linear, "kernel_available", no_build)
    before = _targets(module)
    for custom_op in (False, True):
        assert use_streaming_linear(module, custom_op=custom_op) == 0
        assert use_prefix_attention(module, custom_op=custom_op) == 0
    assert prefer_column_major_wide_weights(module) == []
    assert _targets(module) == before
    assert {torch.ops.aten.linear.default, torch.ops.aten.scaled_dot_product_attention.default} <= before
    keys = torch.empty(1, 2, 16, 8, device="meta")
    mask = torch.ones(1, 16, dtype=torch.bool, device="meta")
    out = prefix_attention(q.to("meta"), keys, keys, mask)
    assert out.shape == (1, 2, 1, 8) and out.device.type == "meta"


@pytest.mark.device_generic
def test_cpu_rewrites_follow_the_device(one_thread: None, device: torch.device) -> None:
    """On the CPU the kernel and the cut attention are swapped in; on any other device nothing is. The
    outputs are those of the unrewritten program either way."""
    module, inputs = _attention_program()
    module.to(device)
    args = [t.to(device) for t in inputs]
    with torch.no_grad():
        want = module(*args)
    on_cpu = device.type == "cpu"
    kernel = on_cpu and streaming_linear.kernel_available()
    assert use_streaming_linear(module) == int(kernel)
    assert use_prefix_attention(module) == int(on_cpu)
    with torch.no_grad():
        torch.testing.assert_close(module(*args), want, rtol=1e-5, atol=1e-5)


@pytest.mark.device_generic
def test_tp1_generation_on_the_device(device: torch.device, tmp_path: Path) -> None:
    """A tp=1 causal LM loaded onto the device (weights, a zero KV cache, factory ops) generates the
    tokens of a CPU reference that recomputes the whole sequence every step."""
    art = build_lm_artifact(tmp_path / "art", [VOCAB], max_seq_len=16, with_tokenizer=False)
    program = load_rank(art, 0, device)
    assert program.module.get_buffer("cache.key_0").device.type == device.type
    prompt = [BOS, 72, 105, 33]
    got = CausalLM(program).generate(prompt, max_new_tokens=8)
    assert got == reference_generate(full_weights(VOCAB), prompt, 8, 16, {EOS})


@pytest.mark.device_generic
def test_two_spawned_ranks_on_the_device(device: torch.device, tmp_path: Path) -> None:
    """Two spawned ranks on the device (NCCL with a GPU each, gloo on CUDA tensors when they share one)
    generate the CPU reference's tokens."""
    art = build_lm_artifact(tmp_path / "art", [130, 129], max_seq_len=24, with_tokenizer=False)
    backend = "gloo" if device.type == "cuda" and torch.cuda.device_count() < 2 else None
    prompt = [BOS, 1, 2, 3]
    result = generate_text(art, prompt, max_new_tokens=10, device=device.type, backend=backend)
    assert result.new_ids == reference_generate(full_weights(VOCAB), prompt, 10, 24, {EOS})


def test_compiled_decode_uses_cuda_graphs_only_where_they_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided from the program's device and the bound transport (a stand-in program: only ``.device`` is
    read; the backend name is mocked), never from a GPU."""
    from tpcompile.runtime.kernels import compiled

    class _Program:
        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    cuda = _Program("cuda:0")
    assert not compiled.use_cuda_graphs(_Program("cpu"))  # type: ignore[arg-type]
    monkeypatch.setattr(compiled, "current_binding", lambda: None)
    assert compiled.use_cuda_graphs(cuda)  # type: ignore[arg-type]
    monkeypatch.setattr(compiled, "current_binding", lambda: ("tp", 2, None))
    for backend, captured in (("nccl", True), ("gloo", False)):  # gloo stages CUDA tensors through the host
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert compiled.use_cuda_graphs(cuda) is captured  # type: ignore[arg-type]
    monkeypatch.setenv("TPCOMPILE_CUDA_GRAPHS", "0")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert not compiled.use_cuda_graphs(cuda)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- NCCL faults


def test_watchdog_fires_only_when_armed_and_stalled() -> None:
    fired: list[str] = []
    watchdog = ProgressWatchdog(0.3, on_fire=fired.append, poll_s=0.02)
    try:
        with watchdog.watching():
            for _ in range(8):  # beating: alive for 0.8 s, well past the timeout
                time.sleep(0.1)
                watchdog.beat()
        time.sleep(0.5)  # disarmed (waiting for a prompt): never fires
        assert fired == []
        with watchdog.watching():
            wait_for(lambda: bool(fired), 5, "the watchdog to fire")
        assert fired == [f"collective timed out after 0.3 s without progress {HINT}"]
    finally:
        watchdog.close()
    gone = subprocess.Popen(["true"])
    gone.wait()
    fired.clear()
    watchdog = ProgressWatchdog(60, {1: os.getpid(), 2: gone.pid}, on_fire=fired.append, poll_s=0.02)
    try:
        with watchdog.watching():
            wait_for(lambda: bool(fired), 5, "the watchdog to notice the dead peer")
    finally:
        watchdog.close()
    assert fired == [f"rank 2 (pid {gone.pid}) exited during a collective"]


def test_a_stalled_rank_exits_1_with_one_line() -> None:
    """The real thing: a rank whose main thread is stuck (here in ``sleep``; on a GPU, in a CUDA sync
    waiting for NCCL) is ended by the watchdog thread: one line, exit code 1, within the timeout."""
    code = (
        "import time\n"
        "from tpcompile.runtime.transport.watchdog import ProgressWatchdog\n"
        "with ProgressWatchdog(1.0).watching():\n"
        "    time.sleep(60)\n"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=60
    )
    assert time.monotonic() - started < 30
    assert (proc.returncode, proc.stderr) == (
        1,
        f"tprun: error: collective timed out after 1 s without progress {HINT}\n",
    )


def test_same_host_peers_come_from_the_store() -> None:
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=10))
    store.set("tpcompile/peer/1", "some-other-host 4242")
    store.set("tpcompile/peer/2", f"{socket.gethostname()} 4343")
    assert same_host_peers(0, 3, store) == {2: 4343}
    assert store.get("tpcompile/peer/0").decode() == f"{socket.gethostname()} {os.getpid()}"
    assert same_host_peers(0, 1, store) == {}


def test_nccl_errors_are_one_collective_line(capsys: pytest.CaptureFixture[str]) -> None:
    remote = dist.DistBackendError(
        "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or "
        "there was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a "
        "network error or a remote process exiting prematurely."
    )
    timeout = dist.DistBackendError(
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran "
        "for 330012 milliseconds before timing out.\nmore lines"
    )
    assert report_exception(backend_failure(remote)) == 1
    assert report_exception(backend_failure(timeout)) == 1
    assert capsys.readouterr().err == (
        "tprun: error: collective failed: NCCL error: remote process exited or there was a network error, "
        "NCCL version 2.21.5\n"
        "tprun: error: collective failed: [Rank 0] Watchdog caught collective operation timeout: "
        f"WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for 330012 milliseconds before timing out. {HINT}\n"
    )
    other = ValueError("not a backend's")
    assert backend_failure(other) is other
    assert isinstance(backend_failure(remote), CollectiveError)


def test_nccl_is_set_up_before_the_process_group_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked GPUs and ``init_process_group``: by the time the group is created, the rank's GPU is selected
    and NCCL errors are set to be raised rather than abort the process (overriding torchrun's 1); a
    refusal (two ranks on one GPU) is one line that says what to do."""
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="1", RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    selected = _fake_gpus(monkeypatch, 1)
    _local(monkeypatch, 1, 2)
    seen: list[tuple[str | None, list[torch.device]]] = []
    refusal = "ncclInvalidUsage: Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000"

    def init_process_group(**kwargs: object) -> None:
        seen.append((os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), list(selected)))
        raise RuntimeError(f"{refusal}\nmore lines")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    backend, device = choose_backend(2, None, "cuda")  # two local ranks, one GPU: both on cuda:0
    with pytest.raises(BackendError) as caught:
        init_group(backend, device, 30.0)
    assert seen == [("2", [torch.device("cuda", 0)])]
    assert str(caught.value) == (
        f"cannot initialise nccl process group: {refusal} "
        "(2 local ranks share 1 GPU(s); NCCL needs a GPU per rank: use --backend gloo)"
    )


# --------------------------------------------------------------------------- CPU pinning


def _cores(node: int, first: int, count: int, smt: int) -> tuple[tuple[int, ...], ...]:
    """``count`` cores from CPU ``first`` with ``smt`` hardware threads each (siblings 16 CPUs apart)."""
    return tuple(tuple(first + c + 16 * t for t in range(smt)) for c in range(count))


def test_cpu_sets_give_each_rank_its_own_cores() -> None:
    one_node = Topology((_cores(0, 0, 4, 2),))  # 4 cores x 2 threads: (0,16) (1,17) (2,18) (3,19)
    assert plan_cpu_sets(one_node, 2) == [(0, 16, 1, 17), (2, 18, 3, 19)]  # whole cores, never split
    assert plan_cpu_sets(one_node, 3) == [(0, 16), (1, 17), (2, 18)]  # equal shares; core 3 stays idle
    assert plan_cpu_sets(one_node, 8) == [(0,), (16,), (1,), (17,), (2,), (18,), (3,), (19,)]
    assert plan_cpu_sets(one_node, 9) is None  # more ranks than CPUs: left to the scheduler
    assert plan_cpu_sets(one_node, 2, threads=4) is not None
    assert plan_cpu_sets(one_node, 2, threads=5) is None  # OMP_NUM_THREADS=5 does not fit 4 CPUs
    two_nodes = Topology((_cores(0, 0, 4, 1), _cores(1, 4, 4, 1)))
    assert plan_cpu_sets(two_nodes, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]  # one rank per NUMA node
    assert plan_cpu_sets(two_nodes, 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]  # never across nodes
    assert plan_cpu_sets(two_nodes, 1) == [(0, 1, 2, 3)]


def test_topology_is_read_from_sys_within_the_allowed_cpus(tmp_path: Path) -> None:
    for node, cpus in (("node0", "0-1,4-5"), ("node1", "2-3,6-7")):
        (tmp_path / "node" / node).mkdir(parents=True)
        (tmp_path / "node" / node / "cpulist").write_text(cpus + "\n")
    for cpu in range(8):
        (tmp_path / f"cpu/cpu{cpu}/topology").mkdir(parents=True)
        (tmp_path / f"cpu/cpu{cpu}/topology/thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    # a taskset -c 0,1,2,4,5 around tprun: CPU 2's sibling 6 and CPUs 3, 7 are not ours
    topology = read_topology([0, 1, 2, 4, 5], tmp_path)
    assert topology.nodes == (((0, 4), (1, 5)), ((2,),))
    assert plan_cpu_sets(topology, 2) == [(0, 4), (2,)]  # equal shares: one core each


def test_launcher_environment_carries_the_pinning() -> None:
    pinned = worker_env(1, 2, 1234, {CPUS_ENV: "stale", "PATH": "/bin"}, (3, 4))
    assert (pinned[CPUS_ENV], pinned["OMP_NUM_THREADS"]) == ("3,4", "2")
    plain = worker_env(1, 2, 1234, {CPUS_ENV: "stale", "PATH": "/bin"})
    assert CPUS_ENV not in plain
    assert rank_cpu_sets("none", 2) is None


def _cpus_allowed(pid: int) -> str | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.MULTILINE)
    return found.group(1) if found else None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_spawned_ranks_run_on_cores_of_their_own(tmp_path: Path) -> None:
    """tprun at tp=2 on this machine's first two CPUs: each rank's /proc status allows exactly one, and not
    the same one (the plan's first CPUs are 0 and 1 when those are two cores on one node)."""
    art = build_lm_artifact(tmp_path / "art", [130, 129], max_seq_len=4096, eos=[], with_tokenizer=False)
    plan = rank_cpu_sets("auto", 2)
    assert plan is not None
    proc = start(
        "tpcompile.runtime.cli", art, "--prompt", "abc", "--no-chat-template", "--max-new-tokens", "4000"
    )
    try:
        wait_for(lambda: len(children(proc.pid)) == 2 and all(_ranks_pinned(proc.pid)), 120, "pinned ranks")
        allowed = sorted(_cpus_allowed(pid) or "" for pid in children(proc.pid))
        assert allowed == sorted(",".join(map(str, s)) if len(s) > 1 else str(s[0]) for s in plan)
        assert len(set(allowed)) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def _ranks_pinned(launcher: int) -> list[bool]:
    everything = _cpus_allowed(os.getpid())
    return [_cpus_allowed(pid) not in (None, everything) for pid in children(launcher)]


def test_a_torchrun_rank_pins_itself_from_local_rank() -> None:
    code = (
        "import sys\n"
        "from tpcompile.runtime.cpu_bind import bind_local_rank\n"
        "print(bind_local_rank(sys.argv[1]), sorted(__import__('os').sched_getaffinity(0)))\n"
    )
    env = {**cli_env(), "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, check=True
        ).stdout
        for mode in ("auto", "none")
    }
    plan = rank_cpu_sets("auto", 2)
    everything = sorted(os.sched_getaffinity(0))
    assert runs["none"] == f"False {everything}\n"
    assert runs["auto"] == (f"True {sorted(plan[1])}\n" if plan is not None else f"False {everything}\n")


# --------------------------------------------------------------------------- gpu-check


def test_gpu_check_refuses_a_machine_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run `make gpu-check` instead")
    proc = subprocess.run(
        [sys.executable, "examples/gpu_check.py"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert re.fullmatch(r"gpu-check: error: no CUDA device: [^\n]+\n", proc.stderr), proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------- ONNX sessions


def test_onnx_segment_sessions_share_one_arena(tmp_path: Path) -> None:
    """Every segment session of a rank allocates from the one arena registered for its device (onnxruntime
    says so in its verbose log, read here from a fresh process), instead of one arena per session."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    for i in range(2):
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "x"], ["y"])],
            f"segment{i}",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        onnx.save(model, tmp_path / f"s{i}.onnx")
    code = (
        "import sys, torch, onnxruntime as ort\n"
        "from tpcompile.runtime.onnx import session\n"
        "from tpcompile.runtime.onnx.session import SegmentSession\n"
        "quiet = session.session_options\n"
        "def verbose(*args):\n"
        "    so = quiet(*args)\n"
        "    so.log_severity_level = 0  # the sessions' own log, where onnxruntime says which arena\n"
        "    return so\n"
        "session.session_options = verbose\n"
        "for i in range(2):\n"
        "    s = SegmentSession.open(f'{sys.argv[1]}/s{i}.onnx', 's', ('x',), ('y',), torch.device('cpu'))\n"
        "    [y] = s.run({'x': torch.ones(2)}, {})\n"
        "    assert torch.from_dlpack(y).tolist() == [2.0, 2.0]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, tmp_path], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("This session will use the allocator registered with the environment") == 2
