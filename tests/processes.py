"""Real processes for the tests: start a command as a terminal would, watch processes in /proc, and run a
function of a test module in a process whose C++ kernels are built for another ISA.

:func:`start` gives the command a default SIGINT disposition whatever the test run inherited: a suite
started as a background job (``nohup make test &``) has SIGINT ignored, which every child would inherit,
and Python then installs no KeyboardInterrupt handler at all.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_env

#: ``python -c _DEFAULT_SIGINT ARGS...`` execs ``python ARGS...`` (same pid) with SIGINT back to default.
_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def start(module: str, *args: str | Path) -> subprocess.Popen[str]:
    """``python -m MODULE ARGS`` as a terminal runs it: the leader of its own process group, SIGINT at its
    default disposition; stdout discarded, stderr captured."""
    return start_python("-m", module, *args)


def start_python(*args: str | Path, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``python ARGS`` as :func:`start` runs it (``stdout``: ``subprocess.PIPE`` to read it)."""
    return subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_SIGINT, *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=REPO,
        start_new_session=True,
    )


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name: ``[state, ppid, ...]``; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Pids of ``pid``'s live children."""
    kids = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(entry.name))
    return sorted(kids)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL what is left of the process group ``proc`` leads (cleanup after a failed test)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


#: Marks a test that compares the host's own x86 build of the C++ kernels with an x86-64-v3 (AVX2 + FMA)
#: build: skipped off x86, and where ``TPCOMPILE_CPU_ISA`` already narrows the host's build (both would be
#: one build).
compares_with_avx2_build = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or "TPCOMPILE_CPU_ISA" in os.environ,
    reason="compares the host's own x86 build with an x86-64-v3 one",
)


def outputs_built_for(isa: str, function: str, tmp: Path) -> list[torch.Tensor]:
    """What ``module:function`` (a test module's function returning tensors) returns on one torch thread
    in a fresh process whose C++ kernels are built for ``isa`` (``TPCOMPILE_CPU_ISA``, a GCC ``-march``
    value)."""
    module, name = function.split(":")
    saved = tmp / f"{name}-{isa}.pt"
    script = (
        f"import torch\nfrom {module} import {name}\ntorch.set_num_threads(1)\n"
        f"torch.save({name}(), {str(saved)!r})\n"
    )
    env = dict(os.environ, TPCOMPILE_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True, timeout=900)
    result: list[torch.Tensor] = torch.load(saved)
    return result


def assert_same_bits_as_avx2_build(function: str, tmp: Path) -> None:
    """``module:function`` gives here (the host's own build; the caller runs one torch thread) bit for bit
    the tensors it gives in a process whose kernels are built for x86-64-v3."""
    module, name = function.split(":")
    mine = getattr(importlib.import_module(module), name)()
    theirs = outputs_built_for("x86-64-v3", function, tmp)
    assert len(theirs) == len(mine)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        assert torch.equal(a, b), f"output {i} differs"
