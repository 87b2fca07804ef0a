"""The description of one run, shared by ``tprun``, the worker and :func:`run_artifact`.

``tprun`` builds a :class:`WorkerArgs` from its options and either serialises
it with :meth:`WorkerArgs.to_argv` for spawned workers (parsed back by
:func:`parse_worker_argv`) or hands it to the worker directly when running
under torchrun.  New run modes add fields here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BACKEND_CHOICES", "DEFAULT_TIMEOUT_S", "WorkerArgs", "build_parser", "parse_worker_argv"]

BACKEND_CHOICES = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs to know about one run."""

    artifact: Path
    inputs: Path
    output: Path
    backend: str | None = None
    device: str | None = None
    skip_verify: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    debug: bool = False

    def to_argv(self) -> list[str]:
        """Command-line form understood by :func:`parse_worker_argv` (absolute paths)."""
        argv = [
            str(self.artifact.resolve()),
            "--inputs",
            str(self.inputs.resolve()),
            "-o",
            str(self.output.resolve()),
        ]
        if self.backend is not None:
            argv += ["--backend", self.backend]
        if self.device is not None:
            argv += ["--device", self.device]
        if self.skip_verify:
            argv.append("--skip-verify")
        argv += ["--timeout", repr(self.timeout_s)]
        if self.debug:
            argv.append("--debug")
        return argv


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the worker module."""
    parser = argparse.ArgumentParser(
        prog="python -m tpcompile.runtime.worker", description="Run one rank of a tpcompile artifact."
    )
    parser.add_argument("artifact", type=Path, help="artifact directory (contains manifest.json)")
    parser.add_argument("--inputs", type=Path, required=True, help="safetensors file with the named inputs")
    parser.add_argument("-o", "--output", type=Path, required=True, help="safetensors file to write (rank 0)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    parser.add_argument("--skip-verify", action="store_true", help="do not check file hashes")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    return parser


def parse_worker_argv(argv: Sequence[str]) -> WorkerArgs:
    """Parse worker command-line arguments into :class:`WorkerArgs`."""
    ns = build_parser().parse_args(list(argv))
    return WorkerArgs(
        artifact=ns.artifact,
        inputs=ns.inputs,
        output=ns.output,
        backend=ns.backend,
        device=ns.device,
        skip_verify=ns.skip_verify,
        timeout_s=ns.timeout_s,
        debug=ns.debug,
    )
