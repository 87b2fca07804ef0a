"""The command-line options of every command that launches ranks (``tprun`` and ``tprun serve``), declared
once: how ranks communicate, where they run, how long a collective may wait, and what is checked at load.

Invariant: standard library and click only (the options are parsed before torch is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

from ..cpu_bind import CPU_BIND_MODES
from .args import BACKEND_CHOICES, DEFAULT_TIMEOUT_S

__all__ = ["rank_options"]

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
    """Add the rank options (``backend``, ``device``, ``timeout_s``, ``cpu_bind``, ``skip_verify``,
    ``debug``, ``trust_pickle``, ``no_native``) to a click command."""
    for option in reversed(_RANK_OPTIONS):
        command = option(command)
    return command
