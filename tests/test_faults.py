"""Faults through real ``tprun`` processes on a hand-built tp=2 causal LM: a rank killed or stuck during
generation, Ctrl-C, SIGTERM, a busy ``--port``; and, in-process, how the shared-memory transport and the
process group give up on a dead or silent peer."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from tests.conftest import run_code, tprun
from tests.processes import alive, children, start
from tests.test_lm_runtime_helpers import build_lm_artifact
from tpcompile.runtime.errors import Terminated
from tpcompile.runtime.launch.launcher import free_port
from tpcompile.runtime.launch.lifetime import stop_on_sigterm, stop_signals_deferred
from tpcompile.runtime.transport.distributed import (
    RENDEZVOUS_TIMEOUT_S,
    CollectiveError,
    destroy_group,
    init_group,
)
from tpcompile.runtime.transport.segments import SEGMENT_PREFIX, remove_segments, segment_files
from tpcompile.runtime.transport.shm import ShmCommunicator

GENERATE = ("--prompt", "abc", "--no-chat-template", "--max-new-tokens", "4000")
SHM_MAPPING = f"/dev/shm/{SEGMENT_PREFIX}"
HINT = "(raise --timeout if a rank is legitimately this slow)"


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No EOS and a 4096-token cache: generating 4000 tokens takes seconds, so a fault lands mid-answer."""
    return build_lm_artifact(tmp_path_factory.mktemp("faults") / "art", [130, 129], max_seq_len=4096, eos=[])


def _start(art: Path, *args: str) -> subprocess.Popen[str]:
    """``tprun`` as a terminal would run it: leader of its own process group, default SIGINT handling."""
    return start("tpcompile.runtime.cli", art, *GENERATE, *args)


def _rank_of(pid: int) -> int | None:
    """RANK in ``pid``'s environment (None before the spawned rank has exec'd, or once it is gone)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _mapped_shm(pid: int) -> bool:
    try:
        return SHM_MAPPING in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _children(proc: subprocess.Popen[str], wait_for: Callable[[int], bool], nprocs: int = 2) -> list[int]:
    """Pids of the launcher's ``nprocs`` ranks, by rank, once ``wait_for`` holds for each of them."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        kids = children(proc.pid)
        ranks = {_rank_of(pid): pid for pid in kids}
        if sorted(ranks, key=str) == list(range(nprocs)) and all(wait_for(pid) for pid in kids):
            return [ranks[r] for r in range(nprocs)]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the ranks did not get there in time")


def _generating_ranks(proc: subprocess.Popen[str]) -> list[int]:
    """The ranks' pids once all of them have mapped the shared-memory segment (the last step before
    generating), plus a moment so that generation is under way."""
    pids = _children(proc, wait_for=_mapped_shm)
    time.sleep(0.3)
    return pids


def _finish(proc: subprocess.Popen[str], pids: list[int], since: float) -> str:
    """Wait (at most 30 s after the fault) for the launcher; check that no rank and no segment survive."""
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - since < 30
    deadline = time.monotonic() + 5  # the launcher waited for its ranks; this only absorbs /proc lag
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if alive(pid)] == []
    assert segment_files(pids[0]) == []
    assert "Traceback" not in stderr
    assert "prompt tokens:" not in stderr  # the fault did land during generation
    return stderr


def test_killed_rank_stops_every_process_and_is_named(art: Path) -> None:
    proc = _start(art)
    pids = _generating_ranks(proc)
    os.kill(pids[1], signal.SIGKILL)
    stderr = _finish(proc, pids, time.monotonic())
    assert proc.returncode == 1
    # rank 0's own error (its peer exited during a collective), if it noticed before being stopped, is not
    # repeated: the launcher names the rank that failed first
    assert stderr == "tprun: error: rank 1 failed (killed by SIGKILL, e.g. by the out-of-memory killer)\n"


def test_stuck_rank_hits_timeout_in_its_peer(art: Path) -> None:
    """A stopped rank 1 leaves rank 0 waiting in a shared-memory all-gather: --timeout 2 makes it raise,
    and the launcher then ends the stopped rank too."""
    proc = _start(art, "--timeout", "2")
    pids = _generating_ranks(proc)
    os.kill(pids[1], signal.SIGSTOP)
    stderr = _finish(proc, pids, time.monotonic())
    assert proc.returncode == 1
    reason = f"collective timed out after 2 s waiting for rank 1 {HINT}"
    assert stderr == f"tprun: error: rank 0 failed (exit 1): {reason}\n"  # once, not once per rank too


def _stops_every_rank(
    proc: subprocess.Popen[str], pids: list[int], send: Callable[[int, int], None], sig: int
) -> None:
    """``send`` (``os.kill`` or ``os.killpg``) the launcher ``sig``: it stops every rank and says so in one
    line."""
    send(proc.pid, sig)
    stderr = _finish(proc, pids, time.monotonic())
    code, what = (143, "terminated") if sig == signal.SIGTERM else (130, "interrupted")
    assert (proc.returncode, stderr) == (code, f"tprun: error: {what}\n")


def test_ctrl_c_during_generation_stops_all_ranks(art: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group."""
    proc = _start(art)
    _stops_every_rank(proc, _generating_ranks(proc), os.killpg, signal.SIGINT)


def test_sigint_to_launcher_while_ranks_start(art: Path) -> None:
    """``kill -INT`` of the launcher alone, while its ranks are still importing and loading."""
    proc = _start(art)
    _stops_every_rank(proc, _children(proc, wait_for=lambda pid: True), os.kill, signal.SIGINT)


def test_sigterm_to_launcher_stops_all_ranks(art: Path) -> None:
    """What ``timeout``, systemd and CI runners send: handled like Ctrl-C, reported as its own exit code."""
    proc = _start(art)
    _stops_every_rank(proc, _generating_ranks(proc), os.kill, signal.SIGTERM)


def test_ctrl_c_works_when_the_suite_runs_with_sigint_ignored(art: Path) -> None:
    """``nohup make test &`` starts the suite with SIGINT ignored, which every child inherits (and Python
    then installs no KeyboardInterrupt handler): the command under test still gets the default."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = _start(art)
    finally:
        signal.signal(signal.SIGINT, previous)
    _stops_every_rank(proc, _children(proc, wait_for=lambda pid: True), os.kill, signal.SIGINT)


def test_stop_signals_act_only_where_the_launcher_delivers_them() -> None:
    """A Ctrl-C inside ``queue.get`` could leave its lock released twice (a RuntimeError, exit 1, instead
    of "interrupted"): the launcher's wait loop records SIGINT/SIGTERM and raises at its own poll."""
    calls: list[int] = []
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with stop_signals_deferred() as deliver:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # both handlers have run by now, were they not deferred
            assert calls == []
            with pytest.raises(KeyboardInterrupt):
                deliver()
            assert calls == [signal.SIGTERM]  # the SIGTERM handler ran first, in arrival order
            deliver()  # nothing left
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with stop_signals_deferred() as deliver:
            os.kill(os.getpid(), signal.SIGINT)  # ignored on entry: stays ignored
            os.kill(os.getpid(), signal.SIGTERM)  # default: the launcher's "terminated"
            time.sleep(0.05)
            with pytest.raises(Terminated):
                deliver()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        stop_on_sigterm()  # its handler ignores later SIGTERMs: that holds after the block too
        with stop_signals_deferred() as deliver:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            with pytest.raises(Terminated):
                deliver()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


_ENDS_ITSELF = """
import atexit, sys, threading, time
from pathlib import Path
from tpcompile.runtime.launch.lifetime import end_process, exit_status
out = Path(sys.argv[1])
def late_write():
    time.sleep(0.3)
    (out / "thread").write_text("done")
threading.Thread(target=late_write).start()
from concurrent.futures import ThreadPoolExecutor
ThreadPoolExecutor(1).submit(time.sleep, 0.1)  # a pool left open: told to stop at exit, not waited on forever
atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
sys.stdout.write("no newline yet")
sys.stderr.write("nor here")
code = {"none": None, "7": 7}.get(sys.argv[2], sys.argv[2])
end_process(exit_status(SystemExit(code)))
"""


@pytest.mark.parametrize(("code", "status"), [("7", 7), ("none", 0), ("a message", 1)])
def test_a_finished_process_ends_as_a_normal_exit_would(code: str, status: int, tmp_path: Path) -> None:
    """end_process skips only the module teardown: a thread that is not a daemon is waited for (a thread
    pool left open is told to stop first), then the exit handlers run, buffered output is flushed, and the
    status is what ``sys.exit`` would give (a message: printed, status 1)."""
    proc = run_code(_ENDS_ITSELF, tmp_path, code, timeout=60)
    assert proc.returncode == status
    assert proc.stdout == "no newline yet"
    assert proc.stderr == "nor here" + ("a message\n" if code == "a message" else "")
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"  # the handler ran after the thread had ended


def test_busy_port_is_a_one_line_error(art: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = tprun(art, *GENERATE, "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"tprun: error: rendezvous port {port} is already in use; pass another --port or omit --port "
        "to pick a free one\n"
    )


def _segment(tmp_path: Path) -> Path:
    path = tmp_path / f"{SEGMENT_PREFIX}test"
    with open(path, "wb") as f:
        f.truncate(2 * 64 + 4 * 8 * 2**20)  # sparse: header lines and two slots per rank
    return path


def test_shm_wait_ends_when_the_peer_process_is_gone(tmp_path: Path) -> None:
    """Each rank publishes its pid in its header line (bytes 8..16 of line r); a waiting rank checks them."""
    path = _segment(tmp_path)
    rank0 = ShmCommunicator(0, 2, path, timeout_s=60)
    ShmCommunicator(1, 2, path)
    with open(path, "r+b") as f:
        f.seek(64 + 8)
        assert struct.unpack("<q", f.read(8)) == (os.getpid(),)
        gone = subprocess.Popen(["true"])
        gone.wait()
        f.seek(64 + 8)
        f.write(struct.pack("<q", gone.pid))  # as if rank 1 had been another process, now exited
    started = time.monotonic()
    with pytest.raises(CollectiveError, match=rf"^rank 1 \(pid {gone.pid}\) exited during a collective$"):
        rank0.all_reduce(torch.ones(3))
    assert time.monotonic() - started < 10  # found by the liveness check, long before the timeout


def test_shm_wait_times_out_on_a_silent_peer(tmp_path: Path) -> None:
    path = _segment(tmp_path)
    rank0 = ShmCommunicator(0, 2, path, timeout_s=0.5)
    ShmCommunicator(1, 2, path)  # alive (this process) but never calls the collective
    with pytest.raises(CollectiveError) as caught:
        rank0.all_gather(torch.ones(3))
    assert str(caught.value) == f"collective timed out after 0.5 s waiting for rank 1 {HINT}"


def test_remove_segments_only_touches_that_rank0(tmp_path: Path) -> None:
    for name in ("tpcompile-123-1", "tpcompile-123-2", "tpcompile-1234-1", "other-123-1"):
        (tmp_path / name).touch()
    removed = remove_segments(123, tmp_path)
    assert sorted(p.name for p in removed) == ["tpcompile-123-1", "tpcompile-123-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-123-1", "tpcompile-1234-1"]


def test_timeout_is_applied_to_the_process_group_collectives(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1"
    ).items():
        monkeypatch.setenv(key, value)
    init_group("gloo", torch.device("cpu"), 7.0)
    try:
        world = dist.group.WORLD
        assert world is not None
        assert world._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=7)
        # joining waits longer: ranks may finish loading their weights far apart
        assert distributed_c10d._get_default_store().timeout == timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    finally:
        destroy_group()
