"""``tprun``: run a tpcompile artifact on this machine (or under torchrun).

::

    tprun OUT --inputs IN.safetensors -o RESULT.safetensors [--backend gloo|nccl]
          [--device cpu|cuda] [--port N] [--timeout S] [--skip-verify] [--debug]

Without torchrun, ``tprun`` spawns one worker process per rank (``tp`` from
the manifest).  Under torchrun (``RANK``/``WORLD_SIZE`` set), each torchrun
process runs its rank in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .distributed import choose_backend, in_torchrun
from .errors import RuntimeArtifactError
from .launcher import RUN_IN_PROCESS, launch
from .manifest import load_artifact_manifest
from .reporting import report_exception
from .tensor_io import order_inputs, read_inputs
from .worker_args import BACKEND_CHOICES, DEFAULT_TIMEOUT_S, WorkerArgs

__all__ = ["main"]


def _preflight(args: WorkerArgs) -> int:
    """Check manifest, inputs and output dir before spawning; return the number of ranks."""
    manifest = load_artifact_manifest(args.artifact)
    order_inputs(manifest.inputs, read_inputs(args.inputs))
    if not in_torchrun():
        # All ranks are local: validate --backend/--device for the highest local rank.
        choose_backend(manifest.tp, args.backend, args.device, local_rank=manifest.tp - 1)
    out_dir = args.output.resolve().parent
    if not out_dir.is_dir():
        raise RuntimeArtifactError(f"output directory {out_dir} does not exist")
    return manifest.tp


def _run(args: WorkerArgs, port: int | None) -> int:
    """Launch the ranks (or run in-process under torchrun) and return the exit code."""
    nprocs = _preflight(args)
    rc = launch(args.to_argv(), nprocs, port)
    if rc == RUN_IN_PROCESS:
        from .worker import execute  # imported lazily: only needed under torchrun

        return execute(args)
    return rc


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--inputs",
    "inputs",
    type=click.Path(path_type=Path, dir_okay=False),
    help="safetensors file with one tensor per manifest input name.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="safetensors file to write the named outputs to.",
)
@click.option(
    "--backend", type=click.Choice(BACKEND_CHOICES), help="default: nccl if GPUs suffice, else gloo."
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="default: follows the backend.")
@click.option("--port", type=click.IntRange(1, 65535), help="rendezvous port (default: a free one).")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="seconds before a stuck collective fails.",
)
@click.option("--skip-verify", is_flag=True, help="do not check file hashes against the manifest.")
@click.option("--debug", is_flag=True, help="print full tracebacks.")
def main(
    artifact: Path,
    inputs: Path | None,
    output: Path | None,
    backend: str | None,
    device: str | None,
    port: int | None,
    timeout_s: float,
    skip_verify: bool,
    debug: bool,
) -> None:
    """Run the tensor-parallel artifact ARTIFACT on the tensors in --inputs."""
    if inputs is None or output is None:
        raise click.UsageError("--inputs and -o/--output are required")
    args = WorkerArgs(
        artifact=artifact,
        inputs=inputs,
        output=output,
        backend=backend,
        device=device,
        skip_verify=skip_verify,
        timeout_s=timeout_s,
        debug=debug,
    )
    try:
        rc = _run(args, port)
    except (Exception, KeyboardInterrupt) as exc:
        rc = report_exception(exc, debug=debug)
    sys.exit(rc)


if __name__ == "__main__":
    main(prog_name="tprun")
