"""``tprun``: run a tpcompile artifact on this machine (or under torchrun).

::

    tprun OUT --inputs IN.safetensors -o RESULT.safetensors [common options]
    tprun OUT --prompt TEXT [--prompt TEXT ...] [--prompt-file F] [generation options] [common options]
    tprun OUT [generation options] < prompts.txt          # one prompt per line
    tprun serve OUT [--host H] [--port N] [--api-key KEY] [--max-queue N]   # OpenAI-compatible server
    tprun calibrate [--tp N] [--out DIR]   # measure this host: hardware profiles host, host-gloo
    common: [--backend gloo|nccl] [--device cpu|cuda] [--port N] [--timeout S] [--skip-verify] [--debug]
            [--trust-pickle] [--cpu-bind auto|none] [--no-native]
            [--nnodes N --node-rank R --master-addr A --master-port P]   # one tprun per host

Without torchrun, ``tprun`` spawns one worker process per rank (``tp`` from
the manifest).  Under torchrun (``RANK``/``WORLD_SIZE`` set), each torchrun
process runs its rank in-process.  Text prompts need a ``causal_lm``
artifact; answers stream to stdout, one summary line per prompt goes to stderr.

Invariant: everything that can be checked before spawning (manifest, file
hashes, program trust, inputs, prompt file, output directories, backend) is
checked once here, so a bad run is one error line and no rank starts.  The
options are parsed before torch is imported (the modules imported at the top
are torch-free), so a usage error answers at once.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import click

from .cpu_bind import bind_local_rank
from .errors import RuntimeArtifactError
from .launch.args import WorkerArgs
from .launch.nodes import LOCALHOST, Nodes
from .launch.options import RankOptions, rank_options
from .lm.options import DEFAULT_MAX_NEW_TOKENS, GenerationArgs, SamplingConfig
from .reporting import EXIT_OK, report_exception
from .usage import OneLineErrors

__all__ = ["main"]


def _check_parent(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise RuntimeArtifactError(f"output directory {parent} does not exist")


def _preflight(args: WorkerArgs) -> int:
    """Check manifest, inputs/prompts and output dirs before spawning; return the number of ranks."""
    from .format import load_artifact_manifest, verify_shared_files
    from .launch.nodes import in_torchrun
    from .lm.prompts import not_a_causal_lm, read_prompt_file
    from .load.program_archive import check_artifact

    manifest = load_artifact_manifest(args.artifact, verify=not args.skip_verify)
    gen = args.generation
    if gen is not None and not manifest.is_causal_lm:
        raise not_a_causal_lm(manifest)
    if not in_torchrun():  # all ranks are local: check every file once, before spawning
        check_artifact(manifest, verify=not args.skip_verify, trust_pickle=args.trust_pickle)
    elif gen is not None and not args.skip_verify:
        verify_shared_files(manifest)
    if gen is not None:
        if gen.prompt_file is not None:
            read_prompt_file(gen.prompt_file)
        for path in (gen.save_tokens, gen.results_json):
            if path is not None:
                _check_parent(path)
    elif args.inputs is not None and args.output is not None:
        from .load.tensor_io import order_inputs, read_inputs

        order_inputs(manifest.inputs, read_inputs(args.inputs), manifest.symbols)
        _check_parent(args.output)
    if not in_torchrun() and (args.backend is not None or args.device is not None):
        # All ranks are local: validate --backend/--device for the highest local rank (without them
        # each rank picks NCCL or gloo itself, which cannot fail; the launcher then never imports torch).
        from .transport.distributed import choose_backend

        choose_backend(manifest.tp, args.backend, args.device, local_rank=manifest.tp - 1)
    return manifest.tp


def _run(args: WorkerArgs, port: int | None, nodes: Nodes | None = None) -> int:
    """Launch the ranks (or run in-process under torchrun) and return the exit code; a failed launch
    raises (see :func:`~tpcompile.runtime.launch.launcher.run_ranks`)."""
    from .launch.launcher import run_ranks
    from .launch.nodes import in_torchrun

    nprocs = _preflight(args)
    if in_torchrun():  # torchrun started the ranks: this process is one of them
        from .launch.worker import execute  # imported lazily: only needed under torchrun

        return execute(args)
    spawned = args if args.skip_verify else replace(args, skip_verify=True)  # hashes checked in _preflight
    with contextlib.ExitStack() as stack:
        stdin = None
        nodes = nodes or Nodes()
        if args.generation is not None and args.generation.read_stdin and nodes.hosts_rank0:
            stdin = stack.enter_context(_stdin_for_rank0())
        run_ranks(spawned, nprocs, port, rank0_stdin=stdin, result=args.output, nodes=nodes)
    return EXIT_OK


@contextlib.contextmanager
def _stdin_for_rank0() -> Iterator[IO[Any]]:
    """What rank 0 reads prompts from: a terminal as it is (each line is answered once typed; rank 0
    checks it), anything else (a pipe, a file) read to its end and checked now, before any rank starts,
    then handed over in a temporary file."""
    from .lm.prompts import spool_stdin

    if sys.stdin is not None and sys.stdin.isatty():
        print("tprun: reading prompts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
        yield sys.stdin
        return
    with tempfile.TemporaryFile() as spool:
        if sys.stdin is not None:
            spool_stdin(sys.stdin.buffer, spool)
        spool.seek(0)
        yield spool


class _Tprun(OneLineErrors, click.Command):
    prog = "tprun"

    def main(self, args: Sequence[str] | None = None, *rest: Any, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if argv[:1] == ["serve"]:  # `tprun serve OUT`: the OpenAI-compatible server (runtime/serve)
            from .serve.command import serve_command

            return serve_command.main(argv[1:], *rest, **extra)
        if argv[:1] == ["calibrate"]:  # `tprun calibrate`: measure this host for the cost model
            from .calibrate.command import calibrate_command

            return calibrate_command.main(argv[1:], *rest, **extra)
        return super().main(argv, *rest, **extra)


@click.command(cls=_Tprun, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--port", type=click.IntRange(1, 65535), help="rendezvous port (default: a free one).")
@rank_options
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="hosts the ranks are spread over (tp / nnodes each); run tprun on every host.",
)
@click.option(
    "--node-rank", type=click.IntRange(min=0), default=0, show_default=True, help="this host's index."
)
@click.option(
    "--master-addr",
    default=LOCALHOST,
    show_default=True,
    help="address of host 0 (rank 0's rendezvous store), reachable from every host.",
)
@click.option(
    "--master-port",
    type=click.IntRange(1, 65535),
    help="rendezvous port on --master-addr, the same on every host (needed with --nnodes > 1).",
)
@click.option(
    "--prompt", "prompts", multiple=True, help="text to answer (repeatable); needs a causal_lm artifact."
)
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="file whose whole content is one prompt.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    help="stop after this many new tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="0 = greedy; > 0 samples.",
)
@click.option("--top-k", type=click.IntRange(min=1), help="sample among the k most likely tokens.")
@click.option(
    "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="sample from the top-p probability mass."
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the sampling generator.")
@click.option("--no-chat-template", is_flag=True, help="tokenize prompts as plain text.")
@click.option(
    "--compile",
    "compile_decode",
    is_flag=True,
    help="compile the decode step with TorchInductor (faster tokens; the first run compiles for ~1 min).",
)
@click.option(
    "--profile",
    is_flag=True,
    help="each rank prints, per prompt, where a decode step goes (weights, kernels, collectives, host).",
)
@click.option(
    "--save-tokens",
    type=click.Path(path_type=Path, dir_okay=False),
    help="write [{prompt_ids, new_ids}, ...] as JSON.",
)
def main(
    artifact: Path,
    inputs: Path | None,
    output: Path | None,
    port: int | None,
    ranks: RankOptions,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int | None,
    prompts: tuple[str, ...],
    prompt_file: Path | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    no_chat_template: bool,
    compile_decode: bool,
    profile: bool,
    save_tokens: Path | None,
) -> None:
    """Run the tensor-parallel artifact ARTIFACT on the tensors in --inputs, or generate text.

    Text: answer each --prompt / --prompt-file, or (with neither --prompt nor
    --inputs) each line of stdin, streaming the answer to stdout.
    """
    generation = None
    if inputs is not None or output is not None:
        if inputs is None or output is None:
            raise click.UsageError("--inputs and -o/--output are required")
        if prompts or prompt_file is not None:
            raise click.UsageError("--prompt/--prompt-file cannot be combined with --inputs")
        if compile_decode or profile:
            raise click.UsageError("--compile and --profile apply to text generation, not to --inputs")
    else:
        generation = GenerationArgs(
            prompts=prompts,
            prompt_file=prompt_file,
            read_stdin=not prompts and prompt_file is None,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, seed),
            chat_template=not no_chat_template,
            save_tokens=save_tokens,
            compile_decode=compile_decode,
            profile=profile,
        )
    args = ranks.worker_args(artifact, inputs=inputs, output=output, generation=generation)
    try:
        bind_local_rank(ranks.cpu_bind)  # under torchrun: this rank's cores, before torch starts a thread
        rc = _run(args, port, Nodes(nnodes, node_rank, master_addr, master_port))
    except (Exception, KeyboardInterrupt) as exc:
        rc = report_exception(exc, debug=ranks.debug)
    sys.exit(rc)


if __name__ == "__main__":
    main()
