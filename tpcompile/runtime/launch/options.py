"""The command-line options of every command that launches ranks (``tprun`` and ``tprun serve``), declared
once: how ranks communicate, where they run, how long a collective may wait, and what is checked at load.

Invariant: standard library and click only (the options are parsed before torch is imported).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..cpu_bind import CPU_BIND_MODES
from .args import BACKEND_CHOICES, DEFAULT_TIMEOUT_S, WorkerArgs

__all__ = ["RankOptions", "rank_options"]


@dataclass(frozen=True)
class RankOptions:
    """How the ranks of a run are launched and loaded, as the user chose it."""

    backend: str | None = None
    device: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    cpu_bind: str = "auto"
    skip_verify: bool = False
    debug: bool = False
    trust_pickle: bool = False
    native: bool = True

    def worker_args(self, artifact: Path, **run: Any) -> WorkerArgs:
        """The :class:`WorkerArgs` of a run of ``artifact`` with these options; ``run`` names what the run
        does (``inputs``/``output``, ``generation`` or ``serve``) and may override an option."""
        args = WorkerArgs(
            artifact=artifact,
            backend=self.backend,
            device=self.device,
            timeout_s=self.timeout_s,
            cpu_bind=self.cpu_bind,
            skip_verify=self.skip_verify,
            debug=self.debug,
            trust_pickle=self.trust_pickle,
            native=self.native,
        )
        return dataclasses.replace(args, **run)


F = TypeVar("F", bound=Callable[..., object])

_RANK_OPTIONS = (
    click.option(
        "--backend", type=click.Choice(BACKEND_CHOICES), help="default: nccl if GPUs suffice, else gloo."
    ),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), help="default: follows the backend."),
    click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=1.0),
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="seconds before a stuck collective fails (and with it the command).",
    ),
    click.option(
        "--cpu-bind",
        type=click.Choice(CPU_BIND_MODES),
        default="auto",
        show_default=True,
        help="pin each rank to cores of its own (one NUMA node each when there are several), if they fit.",
    ),
    click.option("--skip-verify", is_flag=True, help="do not check file hashes against the manifest."),
    click.option("--debug", is_flag=True, help="print full tracebacks."),
    click.option(
        "--trust-pickle", is_flag=True, help="load programs that hold pickled data (runs their code)."
    ),
    click.option(
        "--no-native",
        is_flag=True,
        help="run the eager programs even where the artifact has native ones this host can run.",
    ),
)


def rank_options(command: F) -> F:
    """Add the rank options to a click command, which receives them as one ``ranks: RankOptions``."""

    @functools.wraps(command)
    def with_ranks(*args: Any, **kwargs: Any) -> Any:
        no_native = kwargs.pop("no_native")
        names = ("backend", "device", "timeout_s", "cpu_bind", "skip_verify", "debug", "trust_pickle")
        ranks = RankOptions(**{name: kwargs.pop(name) for name in names}, native=not no_native)
        return command(*args, ranks=ranks, **kwargs)

    wrapped: Any = with_ranks
    for option in reversed(_RANK_OPTIONS):
        wrapped = option(wrapped)
    return wrapped
