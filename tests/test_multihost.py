"""`tprun --nnodes --node-rank --master-addr --master-port`: one tprun per host, each spawning its share of
the ranks; ranks on different hosts talk over the process group (gloo TCP), never shared memory.

The two-host runs here put both "hosts" on this machine: on loopback (any user), and in two network
namespaces joined by a delayed link (bench/two_hosts.py; root only, skipped otherwise with the reason)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from examples import gpt
from tests.conftest import REPO, cli_env, tpcompile, tprun
from tpcompile.runtime.launch.launcher import free_port


@pytest.fixture(scope="module")
def gpt_tp2(gpt_pt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mh") / "gpt-tp2"
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "--nnodes > 1 needs --master-port (the same on every host)"),
        (
            ["--nnodes", "3", "--master-port", "29999"],
            "the artifact's 2 ranks do not split evenly over 3 hosts; use an --nnodes that divides 2",
        ),
        (
            ["--nnodes", "2", "--node-rank", "2", "--master-port", "29999"],
            "--node-rank must be in 0..1 (got 2)",
        ),
    ],
)
def test_bad_node_layout(gpt_tp2: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    save_file({"idx": torch.zeros(1, 4, dtype=torch.long)}, str(tmp_path / "in.safetensors"))
    proc = tprun(gpt_tp2, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors", *flags)
    assert proc.returncode == 2
    assert _one_line(proc) == f"tprun: error: {message}"


def test_two_tprun_processes_make_one_job(gpt_tp2: Path, tmp_path: Path) -> None:
    """Two `tprun --nnodes 2` on loopback (a rank each) give the one-host result; only node 0 writes it."""
    idx = torch.randint(0, gpt.GPTConfig().vocab_size, (1, 9))
    save_file({"idx": idx}, str(tmp_path / "in.safetensors"))
    port = str(free_port())
    cmd = [
        sys.executable,
        "-m",
        "tpcompile.runtime.cli",
        str(gpt_tp2),
        "--inputs",
        str(tmp_path / "in.safetensors"),
    ]
    procs = [
        subprocess.Popen(
            [
                *cmd,
                "-o",
                str(tmp_path / f"out{node}.safetensors"),
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--master-port",
                port,
                "--cpu-bind",
                "none",
            ],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for node in (1, 0)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert not (tmp_path / "out1.safetensors").exists()
    got = load_file(str(tmp_path / "out0.safetensors"))["output"]
    with torch.no_grad():
        expected = gpt.build_model()(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def _two_hosts_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO / "bench"))
    import two_hosts

    return two_hosts


@pytest.mark.slow
def test_smollm2_across_two_namespaces_with_delay(compiled_smollm2) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2 at tp=2 with one rank in each of two network namespaces, 2 ms one-way delay on their link:
    the same greedy tokens as on one host."""
    two_hosts = _two_hosts_module()
    why = two_hosts.missing_requirements()
    if why is not None:
        pytest.skip(f"two-host simulation {why}")
    art = compiled_smollm2(2)
    reference = two_hosts.run_one_host(art, 8)
    with two_hosts.namespaces():
        kind = "netem" if two_hosts.netem_available() else "tun"
        with two_hosts.delayed_link(kind, 2.0) as devs:
            got = two_hosts.run_across(art, 8, devs, timeout_s=300)
    assert got.new_ids == reference.new_ids
    assert len(got.new_ids) == 8
    assert not any(
        ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for ns in two_hosts.NS
    )


def test_worker_env_numbers_ranks_across_hosts() -> None:
    from tpcompile.runtime.launch.launcher import worker_env
    from tpcompile.runtime.launch.nodes import Nodes

    nodes = Nodes(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    env = worker_env(1, 2, 29500, base={}, nodes=nodes)  # local rank 1 of host 1, 2 ranks per host
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
    }
    assert [nodes.global_rank(4, r) for r in (0, 1)] == [2, 3]
