"""Per-rank worker: ``python -m tpcompile.runtime.worker ARTIFACT --inputs IN -o OUT``.

Each rank loads its program, joins the process group, runs the forward pass
once and rank 0 writes the named outputs.  Arguments are described by
:class:`~tpcompile.runtime.worker_args.WorkerArgs`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .distributed import DistEnv, choose_backend, configure_device, destroy_group, init_group
from .errors import BackendError
from .launcher import bind_lifetime_to_launcher
from .loader import load_rank
from .manifest import load_artifact_manifest
from .reporting import EXIT_OK, report_exception
from .tensor_io import order_inputs, read_inputs, write_outputs
from .worker_args import WorkerArgs, parse_worker_argv

__all__ = ["execute", "main", "run_worker"]


def run_worker(args: WorkerArgs) -> None:
    """Run this rank to completion; raise on any error.

    Everything that can fail locally (manifest, hashes, weights, inputs) is
    done before joining the process group so errors surface immediately.
    """
    env = DistEnv.from_environ()
    manifest = load_artifact_manifest(args.artifact)
    if manifest.tp != env.world_size:
        raise BackendError(f"artifact was compiled for tp={manifest.tp} but WORLD_SIZE={env.world_size}")
    backend, device = choose_backend(manifest.tp, args.backend, args.device, local_rank=env.local_rank)
    configure_device(device, env.local_world_size)

    program = load_rank(args.artifact, env.rank, device, verify=not args.skip_verify, manifest=manifest)
    inputs = order_inputs(manifest.inputs, read_inputs(args.inputs, device))

    group_name = init_group(backend, device, args.timeout_s, local_world_size=env.local_world_size)
    try:
        program.bind_group(group_name)
        outputs = program(*inputs)
        if env.rank == 0:
            write_outputs(args.output, manifest.outputs, outputs)
    finally:
        destroy_group()


def execute(args: WorkerArgs) -> int:
    """Run :func:`run_worker`, reporting errors as one line; return the exit code."""
    try:
        run_worker(args)
    except (Exception, KeyboardInterrupt) as exc:
        return report_exception(exc, debug=args.debug)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tpcompile.runtime.worker``."""
    bind_lifetime_to_launcher()
    return execute(parse_worker_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
