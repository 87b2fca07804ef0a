"""The worker's text-generation mode (``tprun OUT --prompt ...``): its arguments, session and results.

Rank 0 tokenizes the prompts and broadcasts their ids once the ranks are
connected, so no other rank imports transformers or holds a tokenizer (~77
MiB and ~1.5 s of start-up each). The first rank of every other host also
tokenizes the command line's prompts, only to reject a bad one as soon as
rank 0 does (before any weight is loaded, on every host). Stdin prompts:
rank 0 reads a line, encodes it and broadcasts its ids (or that it rejected
it). Rank 0 alone writes to stdout (the streamed answer), prints the summary
line and writes the token files and the results file (:class:`Generation`
records, read back by ``generate_text``).  Invariant: all ranks walk through
the same prompts, as the same ids, in the same order and skip the same ones
(a stdin line that is not text, or too long, is reported by rank 0 alone;
see :mod:`.prompts`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, PromptError, first_line
from ..format import Manifest
from ..load.program import RankProgram
from ..reporting import ERROR_PREFIX, print_verbatim
from ..transport.collectives import broadcast_object
from ..transport.watchdog import ProgressWatchdog
from .generate import CausalLM, GenerationStats, check_prompt_length
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationArgs
from .profile import StepProfiler
from .prompts import not_a_causal_lm, prompt_text, read_prompt_file
from .tokenization import StreamDecoder, encode_prompt, load_tokenizer, tokenizer_dir

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "Generation",
    "GenerationArgs",
    "GenerationSession",
    "read_prompt_file",
]


@dataclass(frozen=True)
class Generation:
    """One answer: decoded ``text`` ("" without a tokenizer), the ids and the timing of rank 0."""

    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    stats: GenerationStats

    def to_record(self) -> dict[str, Any]:
        """The answer as one entry of the results file (``stats`` also gives the decode speed)."""
        stats = {**asdict(self.stats), "decode_tokens_per_s": self.stats.decode_tokens_per_s}
        return {"prompt_ids": self.prompt_ids, "new_ids": self.new_ids, "text": self.text, "stats": stats}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Generation:
        """Inverse of :meth:`to_record`."""
        raw = record["stats"]
        stats = GenerationStats(
            prompt_tokens=raw["prompt_tokens"],
            new_tokens=raw["new_tokens"],
            time_to_first_token_s=raw["time_to_first_token_s"],
            decode_s=raw["decode_s"],
        )
        return cls(record["text"], record["prompt_ids"], record["new_ids"], stats)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class GenerationSession:
    """Prompts -> ids -> generated answers, on one rank."""

    def __init__(self, manifest: Manifest, args: GenerationArgs, rank: int, *, local_rank: int = 0) -> None:
        """``local_rank``: the rank's index on its host; the first rank of a host tokenizes (see above)."""
        if not manifest.is_causal_lm or manifest.lm is None:
            raise not_a_causal_lm(manifest)
        self.manifest = manifest
        self.lm_info = manifest.lm
        self.args = args
        self.rank = rank
        needs_text = bool(args.prompts or args.prompt_file or args.read_stdin)
        if needs_text:
            tokenizer_dir(manifest)  # every rank refuses an artifact without one
        #: rank 0 encodes every prompt and decodes every answer; a first rank elsewhere checks the prompts
        self.tokenizes = rank == 0 or (local_rank == 0 and bool(args.prompts or args.prompt_file))
        wanted = needs_text or bool(manifest.lm.tokenizer)
        self.tokenizer = load_tokenizer(manifest) if self.tokenizes and wanted else None
        self.use_template = args.chat_template and self.lm_info.chat_template
        self.answers: list[Generation] = []
        self.rejected = 0
        self.lines_read = 0
        #: armed while a prompt is answered and beaten at every token (NCCL ranks; see transport.watchdog)
        self.progress: ProgressWatchdog | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text prompt (chat template applied when the artifact has one)."""
        return encode_prompt(self.tokenizer, text, self.use_template)

    def fixed_prompts(self) -> list[list[int]]:
        """Ids of the prompts given on the command line, checked against the KV cache size (empty on a rank
        that does not tokenize them: :meth:`run` gives it rank 0's).

        Raises:
            PromptError: a prompt is empty or too long (detected before any weight is loaded).
        """
        texts = list(self.args.prompts)
        if self.args.prompt_file is not None:
            texts.append(read_prompt_file(self.args.prompt_file))
        if texts and not self.tokenizes:
            return []
        prompts = [self.encode(t) for t in texts] + [list(ids) for ids in self.args.prompt_ids]
        for ids in prompts:
            check_prompt_length(self.lm_info, len(ids))
        return prompts

    def _read_line(self) -> str | None:
        """Rank 0's next non-blank stdin line that is text (a line that is not is reported once, counted
        as rejected and skipped); None at the end of stdin."""
        while raw := sys.stdin.buffer.readline():
            self.lines_read += 1
            try:
                line = prompt_text(raw, f"stdin line {self.lines_read}")
            except InputError as exc:
                self.rejected += 1
                print_verbatim(f"{ERROR_PREFIX}{first_line(exc)}")
                continue
            if line.strip():
                return line
        return None

    def _next_stdin_prompt(self) -> dict[str, Any] | None:
        """Rank 0's next stdin prompt as it is broadcast: ``{"ids": [...]}``, ``{"rejected": message}`` (too
        long; rank 0 has reported it), ``{"error": message}`` (the chat template refused it: every rank
        fails), or None at the end of stdin."""
        line = self._read_line()
        if line is None:
            return None
        try:
            ids = self.encode(line.rstrip("\r\n"))
        except InputError as exc:
            return {"error": str(exc)}
        try:
            check_prompt_length(self.lm_info, len(ids))
        except PromptError as exc:
            print_verbatim(f"{ERROR_PREFIX}{first_line(exc)}")
            return {"rejected": str(exc)}
        return {"ids": ids}

    def stdin_prompts(self) -> Iterator[list[int]]:
        """The ids of one prompt per non-blank stdin line (read and encoded by rank 0, broadcast to all
        ranks); a rejected line counts on every rank and is skipped.

        Raises:
            InputError: rank 0 could not encode a line (on every rank).
        """
        while True:
            got = broadcast_object(self._next_stdin_prompt() if self.rank == 0 else None)
            if not isinstance(got, dict):
                return
            if "error" in got:
                raise InputError(str(got["error"]))
            if "rejected" in got:
                self.rejected += 1
                continue
            yield [int(t) for t in got["ids"]]

    def answer(self, model: CausalLM, prompt_ids: list[int]) -> None:
        """Generate for one prompt; rank 0 streams the text, prints the summary line and keeps a record."""
        args = self.args
        stream = self.rank == 0 and args.stream and self.tokenizer is not None
        decoder = StreamDecoder(self.tokenizer) if stream else None

        def emit(token: int) -> None:
            if self.progress is not None:
                self.progress.beat()
            piece = decoder.feed(token) if decoder is not None else ""
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()

        profiler = None
        if args.profile:
            weight_bytes = self.manifest.rank_entry(self.rank).weight_bytes
            kind = "native" if model.program.native is not None else "eager"
            profiler = StepProfiler(self.rank, kind, weight_bytes)
        with self.progress.watching() if self.progress is not None else contextlib.nullcontext():
            new_ids = model.generate(
                prompt_ids,
                max_new_tokens=args.max_new_tokens,
                **asdict(args.sampling),
                on_token=emit,
                profiler=profiler,
            )
        profile = profiler.result() if profiler is not None else None
        if profile is not None:  # every rank says where its own steps go
            print_verbatim(profile.line())
        if decoder is not None:
            sys.stdout.write(decoder.finish() + "\n")
            sys.stdout.flush()
        stats = model.last_stats
        if self.rank != 0 or stats is None:  # generate() always leaves its stats
            return
        print_verbatim(stats.summary())
        text = str(self.tokenizer.decode(new_ids, skip_special_tokens=True)) if self.tokenizer else ""
        self.answers.append(Generation(text, list(prompt_ids), new_ids, stats))

    def load_model(self, program: RankProgram, compile_decode: bool) -> CausalLM:
        """The rank's :class:`CausalLM`; with ``compile_decode``, its decode step is compiled right away
        (rank 0 says so on stderr) so that no prompt's timing includes the compilation."""
        compile_decode = compile_decode and program.native is None  # a native program needs no compile
        model = CausalLM(program, compile_decode=compile_decode)
        if compile_decode:
            if self.rank == 0:
                print_verbatim("compiling the decode step with TorchInductor (cached for later runs)...")
            started = time.perf_counter()
            model.warm_up()
            if self.rank == 0:
                print_verbatim(f"decode step compiled in {time.perf_counter() - started:.1f} s")
        return model

    def run(self, model: CausalLM, prompts: list[list[int]]) -> None:
        """Answer the fixed prompts (rank 0's ids, on every rank), then (if asked) each stdin prompt,
        skipping (and reporting) bad ones."""
        shared = broadcast_object(prompts if self.rank == 0 else None)
        assert isinstance(shared, list)  # rank 0 always sends its list
        for ids in shared:
            self.answer(model, [int(t) for t in ids])
        if not self.args.read_stdin:
            return
        for ids in self.stdin_prompts():
            self.answer(model, ids)

    def save(self) -> None:
        """Rank 0 writes ``--save-tokens`` (ids only) and the API's results file (ids, text, stats)."""
        if self.rank != 0:
            return
        if self.args.save_tokens is not None:
            ids = [{"prompt_ids": a.prompt_ids, "new_ids": a.new_ids} for a in self.answers]
            _write_json(self.args.save_tokens, ids)
        if self.args.results_json is not None:
            _write_json(self.args.results_json, [a.to_record() for a in self.answers])
