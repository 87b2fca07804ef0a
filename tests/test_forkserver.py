"""The suite's fork server (tests/forkserver.py) runs ``tpcompile`` as a fresh interpreter does: the same exit
status, stdout and stderr as ``python -m tpcompile.cli`` for a usage error, an input error and a compile,
and the compile's files are byte for byte the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import conftest


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["missing.pt2", "--tp", "2", "-o", "{tmp}/out"],
        ["gpt", "--tp", "2", "-o", "{tmp}/out", "--quiet"],  # quiet: the ranks report in either order
    ],
    ids=["usage", "input", "compile"],
)
def test_forked_command_equals_a_fresh_interpreter(args: list[str], gpt_pt2: Path, tmp_path: Path) -> None:
    outputs = []
    for name, command in (("forked", conftest.tpcompile), ("fresh", _fresh)):
        (tmp_path / name).mkdir()
        filled = [str(gpt_pt2) if a == "gpt" else a.format(tmp=tmp_path / name) for a in args]
        proc = command(*filled)
        files = {
            p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
            for p in sorted((tmp_path / name).rglob("*"))
            if p.is_file()
        }
        text = (proc.stdout + proc.stderr).replace(str(tmp_path / name), "OUT")
        outputs.append((proc.returncode, text, files))
    assert outputs[0] == outputs[1]
    assert conftest.fork_server_in_use()


def _fresh(*args: str) -> subprocess.CompletedProcess[str]:
    return conftest.run("tpcompile.cli", *args)
