"""Option errors of both commands: one line, exit 2, answered before torch is imported (issue 14, items 5
and 12). Each case runs the command as a real process that reports, on exit, whether torch got imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

#: Runs ``python -m MODULE ARGS...`` in-process and prints, at exit, whether torch was imported.
_PROBE = """\
import atexit, runpy, sys
atexit.register(lambda: print("torch imported:", "torch" in sys.modules))
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

TPCOMPILE = "tpcompile.cli"
TPRUN = "tpcompile.runtime.cli"

CASES = [
    (
        TPCOMPILE,
        ["--tp", "abc", "m.pt2", "-o", "out"],
        "Invalid value for '--tp': 'abc' is not a valid integer.",
    ),
    (
        TPCOMPILE,
        ["m.pt2", "--tp", "2", "-o", "out", "--dtype", "bogus"],
        "Invalid value for '--dtype': 'bogus' is not one of 'fp32', 'bf16', 'fp16'.",
    ),
    (TPCOMPILE, ["m.pt2", "-o", "out"], "Missing option '--tp'."),
    (TPCOMPILE, ["verify", "out"], "Missing option '--reference'."),
    (
        TPRUN,
        ["out", "--max-new-tokens", "-5"],
        "Invalid value for '--max-new-tokens': -5 is not in the range x>=1.",
    ),
    (TPRUN, ["out", "--top-p", "2"], "Invalid value for '--top-p': 2.0 is not in the range 0.0<x<=1.0."),
    (TPRUN, ["out", "--inputs", "in.safetensors"], "--inputs and -o/--output are required"),
    (TPRUN, ["out", "--bogus"], "No such option '--bogus'."),
]


def _probe(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, module, *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(("module", "args", "message"), CASES)
def test_option_error_is_one_line_without_torch(module: str, args: list[str], message: str) -> None:
    proc = _probe(module, *args)
    prog = "tpcompile" if module == TPCOMPILE else "tprun"
    assert (proc.returncode, proc.stderr) == (2, f"{prog}: error: {message}\n")
    assert proc.stdout == "torch imported: False\n"


@pytest.mark.parametrize("module", [TPCOMPILE, TPRUN])
def test_help_is_still_the_full_help(module: str) -> None:
    proc = _probe(module, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Usage: ") and "--help" in proc.stdout
    assert proc.stdout.endswith("torch imported: False\n")
