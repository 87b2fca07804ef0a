"""Signals to a running ``tpcompile`` (issue 14, item 1): its worker processes (and the ranks ``verify``
runs) never outlive it, SIGTERM is cleaned up after like Ctrl-C, and nothing is printed after the command
has returned."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import tpcompile
from tests.processes import alive, children, kill_group, start, start_python, wait_for
from tpcompile.artifact.workers import WorkerFailed, worker_pool
from tpcompile.artifact.writer import remove_stale_work_dirs

#: The example GPT at tp=6 (all 6 heads split, so no warning): long enough to be caught while capturing.
COMPILE = ("examples.gpt:build", "--tp", "6", "--quiet")


def _compile_with_workers(out: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """Start a compile; return it and the pids of its capture workers once they run."""
    proc = start("tpcompile.cli", *COMPILE, "-o", out)
    try:
        wait_for(lambda: proc.poll() is not None or bool(children(proc.pid)), 300, "the capture workers")
    except BaseException:
        kill_group(proc)
        raise
    workers = children(proc.pid)
    if not workers:
        kill_group(proc)
        pytest.fail(f"the compile ended before its workers were seen: {proc.communicate()[1]}")
    return proc, workers


def _communicate(proc: subprocess.Popen[str]) -> str:
    """stderr up to its end: every process holding it (the compile and its workers) has exited."""
    try:
        return proc.communicate(timeout=120)[1]
    finally:
        kill_group(proc)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize(
    ("target", "sig", "code", "message"),
    [
        ("compile", signal.SIGTERM, 143, "terminated"),  # kill PID, systemd's first signal
        ("group", signal.SIGTERM, 143, "terminated"),  # timeout(1): the whole process group
        ("group", signal.SIGINT, 130, "interrupted"),  # Ctrl-C in a terminal
    ],
)
def test_signal_stops_compile_and_workers(
    tmp_path: Path, target: str, sig: signal.Signals, code: int, message: str
) -> None:
    out = tmp_path / "out"
    proc, workers = _compile_with_workers(out)
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    stderr = _communicate(proc)
    assert (proc.returncode, stderr) == (code, f"tpcompile: error: {message}\n")
    assert [pid for pid in workers if alive(pid)] == []
    assert _leftovers(out) == []  # no OUT, no working directory


def test_sigkill_of_compile_takes_its_workers(tmp_path: Path) -> None:
    """A SIGKILLed compile cannot clean up, but its workers die with it (and print nothing later); the
    working directory it leaves never loads and goes with the next compile of OUT."""
    out = tmp_path / "out"
    proc, workers = _compile_with_workers(out)
    os.kill(proc.pid, signal.SIGKILL)
    assert _communicate(proc) == ""
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to die with the compile")
    (stale,) = [out.parent / name for name in _leftovers(out)]
    assert remove_stale_work_dirs(out) == [stale]


def test_sigterm_stops_verify_and_the_ranks_it_runs(tmp_path: Path) -> None:
    """``tpcompile verify`` runs the artifact on rank processes: SIGTERM stops them too (one line, 143)."""
    out = tmp_path / "gpt"
    compiled = tpcompile("examples.gpt:build", "--tp", "2", "-o", out, "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    proc = start("tpcompile.cli", "verify", out, "--reference", "examples.gpt:build")
    try:
        wait_for(lambda: proc.poll() is not None or len(children(proc.pid)) == 2, 300, "the verify's ranks")
    except BaseException:
        kill_group(proc)
        raise
    ranks = children(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    stderr = _communicate(proc)
    assert (proc.returncode, stderr) == (143, "tpcompile: error: terminated\n")
    assert len(ranks) == 2 and [pid for pid in ranks if alive(pid)] == []


_SPAWNED_POOL = """\
import time
from tpcompile.artifact.workers import worker_pool
with worker_pool(time.sleep, [600.0, 600.0], 2, "spawn") as pool:
    print(*[p.pid for p in pool.processes], flush=True)
    for _ in pool.results(share=False):
        pass
"""


def test_spawned_workers_die_with_a_killed_parent() -> None:
    """The ONNX conversion's workers are spawned (not forked): they die with a SIGKILLed compiler too."""
    proc = start_python("-c", _SPAWNED_POOL, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.communicate(timeout=60)
        wait_for(lambda: all(alive(pid) for pid in workers), 60, "the workers to start")
        time.sleep(0.5)  # let them get to their 600 s job
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert stderr == ""
        wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to die with their parent")
    finally:
        kill_group(proc)


def _square_or_die(x: int) -> int:
    if x == 5:  # a worker killed mid-job (the out-of-memory killer, say)
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def test_worker_pool_runs_every_job_once_or_says_which_worker_died() -> None:
    with worker_pool(_square_or_die, [x for x in range(12) if x != 5], 2, "fork") as pool:
        assert sorted(pool.results()) == [(i, x * x) for i, x in enumerate(x for x in range(12) if x != 5)]
    with worker_pool(_square_or_die, list(range(12)), 1, "fork") as pool:
        with pytest.raises(WorkerFailed, match="^a worker process was killed by SIGKILL$"):
            list(pool.results(share=False))
        workers = [p.pid for p in pool.processes]
    assert not any(alive(pid) for pid in workers)
