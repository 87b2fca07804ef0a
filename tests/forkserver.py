"""A fork server for the ``tpcompile`` commands the suite runs: one process per pytest worker imports torch,
transformers and the compiler once, and each command is a fork of it that runs ``tpcompile.cli`` as
``python -m tpcompile.cli ARGS`` would (its own process, arguments, working directory, stdout, stderr and
exit status), without paying the ~5 s of imports a fresh interpreter spends before a compile starts.

Invariant: a command run here behaves as it does in a fresh interpreter, except that the imports listed
in ``PRELOAD`` are already done and that it exits without tearing its modules down (its exit handlers
run). The server forks only while it runs no Python thread but its main one, and it runs no torch op, so
no intra-op thread pool exists yet (what a DataLoader's forked workers rely on too); where that does not
hold, or the server does not start, commands run as plain subprocesses. Tests of how a command starts
(its imports, signals, a terminal) start their own processes (tests/processes.py); this serves
``conftest.tpcompile`` only.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from tpcompile.runtime.launch.lifetime import end_process, exit_status

#: What a compile imports before and while it captures a model, found with ``python -X importtime`` (the
#: command's module itself is not preloaded: ``runpy`` runs it fresh as ``__main__``).
PRELOAD = (
    "torch",
    "torch.export",
    "torch.export._trace",
    "torch._inductor.ir",
    "sympy.physics.units",
    "sympy.tensor.tensor",
    "transformers",
    "transformers.masking_utils",
    "transformers.models.llama.modeling_llama",
    "click",
    "tpcompile.compiler",
    "tpcompile.frontend.load",
    "tpcompile.frontend.hf",
    "tpcompile.frontend.quantize",
)


def _child(request: dict[str, Any], replies: TextIO) -> None:
    """In the fork: become ``python -m MODULE ARGS`` and run it; its SystemExit (or its exception) ends this
    process with the exit status and output an interpreter that ran the module would give."""
    replies.close()  # the server's, not this command's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    streams = ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], write), (2, request["stderr"], write))
    for fd, path, flags in streams:
        opened = os.open(str(path), flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's stdin, not the server's requests)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # what -m puts first
    sys.argv = [request["module"], *request["args"]]
    try:  # tpcompile.cli ends its process itself (end_process); the rest is for any other module
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = exit_status(done)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    end_process(code)


def serve() -> None:
    """The server's loop: one JSON request per line on stdin; answers ``{"pid"}`` once the command runs
    and ``{"returncode"}`` when it ends (negative: the signal that ended it, as subprocess reports it)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # line-buffered
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the replies
    for name in PRELOAD:
        __import__(name)
    replies.write(json.dumps({"threads": threading.active_count()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, replies)  # never returns: the module's exit ends this process
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


class ForkServer:
    """The client: :meth:`run` is ``subprocess.run([python, -m, module, *args], capture_output=True,
    text=True, env=env, cwd=cwd, timeout=timeout)``, one command at a time."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self._lock = threading.Lock()
        self._pending = b""  # what the server wrote past the last line read
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", "from tests.forkserver import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        ready = self._read(timeout=120)
        if ready is None or ready.get("threads") != 1:  # forking a threaded process is not safe
            self.close()

    @property
    def usable(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _read(self, timeout: float) -> dict[str, int] | None:
        """The server's next reply; None if it ends, or says nothing for ``timeout`` seconds. Read from the
        pipe itself, not a buffered reader: a reply already buffered would be invisible to ``select``."""
        assert self._proc is not None and self._proc.stdout is not None
        fd, deadline = self._proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def run(
        self, module: str, args: list[str], env: dict[str, str], cwd: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        with self._lock, tempfile.TemporaryDirectory(prefix="tpcompile-forkserver-") as tmp:
            assert self._proc is not None and self._proc.stdin is not None
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"module": module, "args": args, "env": env, "cwd": str(cwd)}
            line = json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n"
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
            started = self._read(timeout=60)
            assert started is not None, "the fork server stopped"
            ended = self._read(timeout)
            cmd = [sys.executable, "-m", module, *args]
            if ended is None:
                os.kill(started["pid"], signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(cmd, ended["returncode"], out.read_text(), err.read_text())

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
