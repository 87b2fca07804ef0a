"""Per-rank worker: ``python -m tpcompile.runtime.launch.worker WORKER_ARGS_JSON``.

Tensor mode: each rank loads its program, joins the process group, runs the
forward pass once, sharded outputs are gathered to their global shape and
rank 0 writes the named outputs.  Generation mode: see
:mod:`tpcompile.runtime.lm.session`.  Arguments are described by
:class:`~tpcompile.runtime.launch.args.WorkerArgs`, given as its JSON
(:meth:`~tpcompile.runtime.launch.args.WorkerArgs.to_json`), the one argument.

Invariant: everything that can fail locally is done before the rank joins the
process group, and a rank ends with an exit code and at most one error line.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Sequence

from ..errors import BackendError, InputError, PromptError, first_line
from ..format import load_artifact_manifest
from ..kernels.compiled import bind_transport, prepare_compiled_decode, use_transport_ops
from ..kernels.native import settle_native
from ..lm.session import GenerationSession
from ..load.loader import load_rank
from ..load.tensor_io import order_inputs, read_inputs, write_outputs
from ..reporting import (
    ERROR_PREFIX,
    EXIT_OK,
    EXIT_USER_ERROR,
    WARNING_PREFIX,
    print_verbatim,
    report_exception,
)
from ..serve.ranks import serve_ranks
from ..transport.collectives import gather_outputs, use_shared_memory
from ..transport.distributed import (
    DistEnv,
    backend_failure,
    choose_backend,
    configure_device,
    destroy_group,
    init_group,
)
from ..transport.shm import ShmCommunicator, shm_supported
from ..transport.watchdog import ProgressWatchdog, same_host_peers
from .args import WorkerArgs
from .lifetime import end_process

__all__ = ["execute", "main", "run_worker"]


def run_worker(args: WorkerArgs) -> int:
    """Run this rank to completion and return its exit code; raise on any error.

    Everything that can fail locally (manifest, hashes, weights, inputs,
    prompt lengths) is done before joining the process group so errors
    surface immediately.
    """
    env = DistEnv.from_environ()
    manifest = load_artifact_manifest(args.artifact, verify=not args.skip_verify)
    if manifest.tp != env.world_size:
        raise BackendError(f"artifact was compiled for tp={manifest.tp} but WORLD_SIZE={env.world_size}")
    backend, device = choose_backend(manifest.tp, args.backend, args.device, local_rank=env.local_rank)
    configure_device(device, env.local_world_size)

    session = None
    prompts: list[list[int]] = []
    if args.generation is not None:
        session = GenerationSession(manifest, args.generation, env.rank, local_rank=env.local_rank)
        prompts = session.fixed_prompts()
    elif args.serve is None and (args.inputs is None or args.output is None):
        raise InputError("--inputs and -o/--output are required")
    program = load_rank(
        args.artifact,
        env.rank,
        device,
        verify=not args.skip_verify,
        manifest=manifest,
        trust_pickle=args.trust_pickle,
        native=args.native,
    )
    inputs = []
    if session is None and args.inputs is not None:
        inputs = order_inputs(manifest.inputs, read_inputs(args.inputs, device), manifest.symbols)

    group_name = init_group(backend, device, args.timeout_s, local_world_size=env.local_world_size)
    try:
        # NCCL waits inside CUDA calls and only aborts: a stalled rank ends itself in one line instead
        watchdog = None
        if backend == "nccl":
            watchdog = ProgressWatchdog(args.timeout_s, same_host_peers(env.rank, env.world_size))
        program.bind_group(group_name)
        comm = None
        if env.world_size > 1 and env.local_world_size == env.world_size and shm_supported(device):
            comm = ShmCommunicator.create(env.rank, env.world_size, args.timeout_s)
        compile_decode = args.generation is not None and args.generation.compile_decode
        message = settle_native(program)  # every rank runs the same kind of program
        if message is not None and env.rank == 0:
            print_verbatim(f"{WARNING_PREFIX}{message}")
        if program.native is not None:  # its collectives are transport ops: the same transport
            bind_transport(group_name, env.world_size, comm)
        elif compile_decode:  # before the rebinding below: the compiled graph keeps opaque collective ops
            prepare_compiled_decode(program, group_name, env.world_size, comm)
        elif comm is None and manifest.casts_all_reduces:  # 16-bit payloads: summed in fp32 (rank_sum.py)
            use_transport_ops(program.module)
            bind_transport(group_name, env.world_size, None)
        if comm is not None:
            program.use_shared_memory(comm)
            use_shared_memory(comm)
        if session is not None:
            session.progress = watchdog
            model = session.load_model(program, compile_decode)
            _freeze_loaded_heap()
            session.run(model, prompts)
            session.save()
            return EXIT_USER_ERROR if session.rejected and env.rank == 0 else EXIT_OK
        _freeze_loaded_heap()
        if args.serve is not None:  # tprun serve: every rank runs the serving loop
            return serve_ranks(program, args.serve, env.rank)
        with watchdog.watching() if watchdog is not None else contextlib.nullcontext():
            outputs = gather_outputs(program(*inputs), [s.placement for s in manifest.outputs])
            if env.rank == 0 and args.output is not None:
                write_outputs(args.output, manifest.outputs, outputs)
    finally:
        destroy_group()
    return EXIT_OK


def _freeze_loaded_heap() -> None:
    """Collect what loading left behind, then exempt every object alive now (the program, the imported
    modules: ~400k objects for a SmolLM2 rank) from garbage collection: no later collection scans them, not
    even a full one in the middle of a decode step or a request. The cost: one full collection here (~0.2
    s). (The rank's exit runs no collection at all: :func:`~.lifetime.end_process`.)"""
    gc.collect()
    gc.freeze()


def _report_prompt_error(exc: PromptError) -> int:
    """Every rank rejects the same prompt: rank 0 reports it once (verbatim), the others exit quietly."""
    if DistEnv.from_environ().rank != 0:
        return EXIT_OK
    print_verbatim(f"{ERROR_PREFIX}{first_line(exc)}")
    return EXIT_USER_ERROR


def execute(args: WorkerArgs) -> int:
    """Run :func:`run_worker`, reporting errors as one line; return the exit code."""
    try:
        return run_worker(args)
    except PromptError as exc:
        return _report_prompt_error(exc)
    except (Exception, KeyboardInterrupt) as exc:
        return report_exception(backend_failure(exc), debug=args.debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tpcompile.runtime.launch.worker WORKER_ARGS_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise InputError("the worker takes one argument, the JSON of its WorkerArgs (tprun writes it)")
        args = WorkerArgs.from_json(argv[0])
    except InputError as exc:
        return report_exception(exc)
    return execute(args)


if __name__ == "__main__":
    # the rank's process group is destroyed in run_worker, its shared-memory files unlinked once mapped:
    # nothing outside the process is left for the interpreter's ~0.9 s module teardown to release
    end_process(main())
