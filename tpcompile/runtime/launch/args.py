"""The description of one run, shared by ``tprun``, the worker and the Python API.

``tprun`` builds a :class:`WorkerArgs` from its options and either serialises
it with :meth:`WorkerArgs.to_argv` for spawned workers (parsed back by
:func:`parse_worker_argv`) or hands it to the worker directly when running
under torchrun.  Invariant: ``parse_worker_argv(args.to_argv()) == args``
(up to paths being made absolute).  A run either maps tensors
(``inputs``/``output`` set) or generates text (``generation`` set).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKEND_CHOICES",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TIMEOUT_S",
    "GenerationArgs",
    "WorkerArgs",
    "build_parser",
    "parse_worker_argv",
]

BACKEND_CHOICES = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationArgs:
    """Text generation: where prompts come from and how tokens are chosen.

    Prompts are, in order: each of ``prompts``, the whole of ``prompt_file``,
    each of ``prompt_ids`` (already tokenized; used by the Python API); when
    ``read_stdin`` is set, rank 0 then reads one prompt per line of stdin.
    """

    prompts: tuple[str, ...] = ()
    prompt_file: Path | None = None
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    read_stdin: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    chat_template: bool = True
    save_tokens: Path | None = None
    results_json: Path | None = None
    stream: bool = True
    compile_decode: bool = False

    def to_argv(self) -> list[str]:
        """Worker options for this generation (``--generate`` first)."""
        argv = ["--generate", *(f"--prompt={p}" for p in self.prompts)]
        if self.prompt_file is not None:
            argv += ["--prompt-file", str(self.prompt_file.resolve())]
        argv += [f"--prompt-ids={','.join(map(str, ids))}" for ids in self.prompt_ids]
        if self.read_stdin:
            argv.append("--stdin")
        argv += ["--max-new-tokens", str(self.max_new_tokens), "--temperature", repr(self.temperature)]
        if self.top_k is not None:
            argv += ["--top-k", str(self.top_k)]
        if self.top_p is not None:
            argv += ["--top-p", repr(self.top_p)]
        argv += ["--seed", str(self.seed)]
        if not self.chat_template:
            argv.append("--no-chat-template")
        if self.save_tokens is not None:
            argv += ["--save-tokens", str(self.save_tokens.resolve())]
        if self.results_json is not None:
            argv += ["--results-json", str(self.results_json.resolve())]
        if not self.stream:
            argv.append("--no-stream")
        if self.compile_decode:
            argv.append("--compile")
        return argv


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs to know about one run."""

    artifact: Path
    inputs: Path | None = None
    output: Path | None = None
    backend: str | None = None
    device: str | None = None
    skip_verify: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    debug: bool = False
    generation: GenerationArgs | None = None
    trust_pickle: bool = False

    def to_argv(self) -> list[str]:
        """Command-line form understood by :func:`parse_worker_argv` (absolute paths)."""
        argv = [str(self.artifact.resolve())]
        if self.inputs is not None:
            argv += ["--inputs", str(self.inputs.resolve())]
        if self.output is not None:
            argv += ["-o", str(self.output.resolve())]
        if self.backend is not None:
            argv += ["--backend", self.backend]
        if self.device is not None:
            argv += ["--device", self.device]
        if self.skip_verify:
            argv.append("--skip-verify")
        argv += ["--timeout", repr(self.timeout_s)]
        if self.debug:
            argv.append("--debug")
        if self.trust_pickle:
            argv.append("--trust-pickle")
        if self.generation is not None:
            argv += self.generation.to_argv()
        return argv


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the worker module."""
    parser = argparse.ArgumentParser(
        prog="python -m tpcompile.runtime.launch.worker", description="Run one rank of a tpcompile artifact."
    )
    parser.add_argument("artifact", type=Path, help="artifact directory (contains manifest.json)")
    parser.add_argument("--inputs", type=Path, help="safetensors file with the named inputs")
    parser.add_argument("-o", "--output", type=Path, help="safetensors file to write (rank 0)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    parser.add_argument("--skip-verify", action="store_true", help="do not check file hashes")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    parser.add_argument("--debug", action="store_true", help="print tracebacks")
    parser.add_argument("--trust-pickle", action="store_true", help="load programs that need unpickling")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--generate", action="store_true", help="generate text instead of mapping tensors")
    gen.add_argument("--prompt", dest="prompts", action="append", default=[])
    gen.add_argument("--prompt-file", type=Path)
    gen.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids")
    gen.add_argument("--stdin", action="store_true", help="rank 0 reads one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat-template", action="store_true")
    gen.add_argument("--save-tokens", type=Path)
    gen.add_argument("--results-json", type=Path)
    gen.add_argument("--no-stream", action="store_true")
    gen.add_argument("--compile", dest="compile_decode", action="store_true", help="Inductor decode step")
    return parser


def _ids(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


def parse_worker_argv(argv: Sequence[str]) -> WorkerArgs:
    """Parse worker command-line arguments into :class:`WorkerArgs`."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    generation = None
    if ns.generate:
        generation = GenerationArgs(
            prompts=tuple(ns.prompts),
            prompt_file=ns.prompt_file,
            prompt_ids=tuple(_ids(t) for t in ns.prompt_ids),
            read_stdin=ns.stdin,
            max_new_tokens=ns.max_new_tokens,
            temperature=ns.temperature,
            top_k=ns.top_k,
            top_p=ns.top_p,
            seed=ns.seed,
            chat_template=not ns.no_chat_template,
            save_tokens=ns.save_tokens,
            results_json=ns.results_json,
            stream=not ns.no_stream,
            compile_decode=ns.compile_decode,
        )
    elif ns.inputs is None or ns.output is None:
        parser.error("--inputs and -o/--output are required unless --generate is given")
    return WorkerArgs(
        artifact=ns.artifact,
        inputs=ns.inputs,
        output=ns.output,
        backend=ns.backend,
        device=ns.device,
        skip_verify=ns.skip_verify,
        timeout_s=ns.timeout_s,
        debug=ns.debug,
        generation=generation,
        trust_pickle=ns.trust_pickle,
    )
