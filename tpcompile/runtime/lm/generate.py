"""Per-rank autoregressive generation with a causal-LM artifact (:class:`CausalLM`).

Invariant: one prompt costs one prefill (all prompt tokens at positions
``0..P-1``) and then one forward pass per further token, each writing one
position of the rank's KV cache; the prompt is never recomputed.  All ranks
run the same sequence of forward passes and collectives and choose the same
tokens (see :mod:`tpcompile.runtime.lm.sampling`), so they stop together.
A new prompt starts again at position 0: the program masks positions past
the current one, so what an earlier prompt left in the cache is harmless.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import BackendError, ManifestError
from ..format import ROW_INPUT_NAMES, SHARED_INPUT_NAMES, LMInfo, Manifest, Shard, TensorSpec
from ..kernels.compiled import bind_transport, compile_decode_step, use_transport_ops
from ..kernels.native import settle_native
from ..kernels.prefix_attention import use_prefix_attention
from ..kernels.streaming_linear import use_streaming_linear
from ..kernels.weight_layout import prefer_column_major_wide_weights
from ..load.loader import load_rank
from ..load.program import RankProgram
from ..transport.distributed import group_device
from .batch import BatchEngine, check_prompt_length
from .profile import StepProfiler
from .sampling import SamplingConfig, VocabShard, choose_tokens
from .scheduler import Request, Scheduler, TokenEvent, run_to_completion

__all__ = ["CausalLM", "GenerationStats", "TokenCallback", "check_prompt_length"]

#: Called with each new token id as soon as every rank agreed on it.
TokenCallback = Callable[[int], None]
LOGITS = "logits"
GREEDY = SamplingConfig()


@dataclass(frozen=True)
class GenerationStats:
    """Timing of one :meth:`CausalLM.generate` call (seconds, wall clock on this rank)."""

    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """``(new_tokens - 1) / decode_s``: tokens after the first, per second (0 if undefined)."""
        if self.new_tokens < 2 or self.decode_s <= 0.0:
            return 0.0
        return (self.new_tokens - 1) / self.decode_s

    def summary(self) -> str:
        """The one-line summary ``tprun --prompt`` prints to stderr."""
        return (
            f"prompt tokens: {self.prompt_tokens} | new tokens: {self.new_tokens} | "
            f"time to first token: {self.time_to_first_token_s:.3f} s | "
            f"decode: {self.decode_tokens_per_s:.1f} tokens/s"
        )


def _logits_spec(manifest: Manifest, lm: LMInfo) -> int:
    """Index of the logits output; checks its placement shards the vocabulary dim (or is R)."""
    names = manifest.output_names
    if LOGITS in names:
        index = names.index(LOGITS)
    elif len(names) == 1:
        index = 0
    else:
        raise ManifestError(f"causal_lm artifact has outputs {names} but no '{LOGITS}'; recompile it")
    spec: TensorSpec = manifest.outputs[index]
    placement = spec.placement
    if isinstance(placement, Shard):
        if placement.dim % max(1, len(spec.shape)) != len(spec.shape) - 1:
            raise ManifestError(f"logits placement {placement} must shard the last (vocabulary) dim")
        if placement.total < lm.vocab_size:
            raise ManifestError(
                f"logits shards cover {placement.total} ids but vocab_size is {lm.vocab_size}; recompile"
            )
    return index


class CausalLM:
    """One rank of a causal-LM artifact: ``generate(prompt_ids) -> new ids``.

    Every rank of the job must call :meth:`generate` with the same arguments
    (the programs contain collectives).  Under torchrun::

        dist.init_process_group("gloo")
        lm = CausalLM.load("out/llama-tp2")
        new_ids = lm.generate([1, 15043, 29892], max_new_tokens=32)
        lm.last_stats.summary()
    """

    def __init__(
        self,
        program: RankProgram,
        group: dist.ProcessGroup | None = None,
        *,
        compile_decode: bool = False,
    ) -> None:
        manifest = program.manifest
        if not manifest.is_causal_lm or manifest.lm is None:
            raise ManifestError(f"{manifest.path} is a '{manifest.kind}' artifact, not a causal LM")
        names = manifest.input_names
        expected = ROW_INPUT_NAMES if manifest.lm.independent_rows else SHARED_INPUT_NAMES
        if sorted(names) != sorted(expected):
            raise ManifestError(f"causal_lm artifact takes inputs {names}; expected {', '.join(expected)}")
        self.program = program
        self.group = group
        self.lm: LMInfo = manifest.lm
        self._order = [names.index(name) for name in expected]
        self._logits = _logits_spec(manifest, self.lm)
        placement = manifest.outputs[self._logits].placement
        self.shard = VocabShard(placement, program.rank, self.lm.vocab_size)
        self.last_stats: GenerationStats | None = None
        self._decode_step = None
        if program.native is not None:
            return  # the native program is the fast path; its package holds the tensors as they are
        # decode streams every weight once per token: read them as fast as this host can (CPU-only
        # rewrites: each leaves a program on any other device as it is)
        if not use_streaming_linear(program.module, custom_op=compile_decode):
            prefer_column_major_wide_weights(program.module)
        use_prefix_attention(program.module, custom_op=compile_decode)  # skip the unwritten cache
        self._decode_step = compile_decode_step(program) if compile_decode else None

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        *,
        device: torch.device | str | None = None,
        verify: bool = True,
        group: dist.ProcessGroup | None = None,
        compile_decode: bool = False,
    ) -> CausalLM:
        """Load this process's rank (``dist.get_rank(group)``) of the artifact.

        The process group must be initialised (e.g. by torchrun + ``init_process_group``).  ``device``
        defaults to the group's: ``cuda:LOCAL_RANK`` (made the current CUDA device) for NCCL, else CPU.
        ``compile_decode`` compiles the decode step with TorchInductor (see
        :mod:`tpcompile.runtime.kernels.compiled`); the first call of :meth:`warm_up` or
        :meth:`generate` then takes a while. An artifact compiled with native programs runs them
        (when this host can) and needs neither.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise BackendError("CausalLM.load needs an initialised process group (torch.distributed)")
        live = group if group is not None else dist.group.WORLD
        if live is None:  # pragma: no cover - is_initialized guarantees WORLD
            raise BackendError("process group initialised but WORLD group is missing")
        dev = torch.device(device) if device is not None else group_device(live)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        program = load_rank(artifact_dir, dist.get_rank(live), dev, live.group_name, verify)
        if program.manifest.tp != dist.get_world_size(live):
            raise BackendError(
                f"artifact was compiled for tp={program.manifest.tp} but the group has "
                f"{dist.get_world_size(live)} ranks"
            )
        message = settle_native(program, live)  # every rank runs the same kind of program
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        # both run the collectives as transport ops; so do 16-bit payloads, summed in fp32 (rank_sum.py)
        if compile_decode or program.native is not None or program.manifest.casts_all_reduces:
            use_transport_ops(program.module)
            bind_transport(live.group_name, dist.get_world_size(live))
        return cls(program, group, compile_decode=compile_decode)

    @property
    def max_seq_len(self) -> int:
        """Positions in the KV cache (prompt + generated tokens must fit)."""
        return self.lm.max_seq_len

    def check_prompt(self, n_tokens: int) -> None:
        """Raise :class:`PromptError` unless a prompt of ``n_tokens`` leaves room for one new token."""
        check_prompt_length(self.lm, n_tokens)

    @property
    def device(self) -> torch.device:
        """Where the program's inputs and outputs live."""
        return self.program.device

    def _run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Last-position local logits ``[B, V_local]`` of the program on ``inputs`` (in input-name order)."""
        ordered = list(inputs)
        for i, t in zip(self._order, inputs, strict=True):
            ordered[i] = t
        run = self._decode_step if self._decode_step is not None and inputs[0].shape[1] == 1 else self.program
        logits = run(*ordered)[self._logits]
        return logits[:, -1, :]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last-position local logits ``[B, V_local]`` for ``ids`` written at ``positions`` (``[T]``, shared
        by every row; an artifact with independent rows runs them in slot 0)."""
        if self.lm.independent_rows:
            return self.forward_rows(ids, positions.expand(ids.shape[0], -1), 0)
        return self._run(ids, positions)

    def forward_rows(self, ids: torch.Tensor, positions: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Last-position local logits ``[B, V_local]`` of an artifact with independent rows: row ``b`` of
        ``ids`` (``[B, T]``) written at its ``positions[b]`` in KV-cache slot ``first_slot + b``."""
        slot = torch.tensor([first_slot], dtype=torch.int64, device=ids.device)
        return self._run(ids, positions, slot)

    def choose(
        self,
        logits: torch.Tensor,
        configs: Sequence[SamplingConfig],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """One token per row of local ``logits``, chosen by ``configs`` (the same on every rank)."""
        return choose_tokens(logits, self.shard, configs, generators, self.group)

    def _choose(
        self, logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> int:
        return self.choose(logits[:1], [sampling], [generator])[0]

    def warm_up(self) -> None:
        """Run one decode step (compiling it if asked), so that the first prompt's timing is the real one.

        Writes position 0 of the KV cache, which every prompt overwrites before reading it.
        """
        device = self.program.device
        batch = 1 if self.lm.independent_rows else self.lm.max_batch_size
        self._forward(
            torch.zeros((batch, 1), dtype=torch.int64, device=device),
            torch.zeros(1, dtype=torch.int64, device=device),
        )

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        on_token: TokenCallback | None = None,
        profiler: StepProfiler | None = None,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` ids after ``prompt_ids``; return them (EOS included).

        Stops at any of the artifact's EOS ids, after ``max_new_tokens``, or
        when the KV cache is full (prompt + new tokens == ``max_seq_len``).
        ``temperature == 0`` is greedy; otherwise tokens are sampled with a
        generator seeded by ``seed`` after top-k / top-p filtering.  Timing is
        left in :attr:`last_stats`.  When the artifact's batch size is above 1
        the prompt fills every row and row 0 is used.  ``profiler`` (``tprun --profile``) times
        every decode step and profiles a few of them (those run slower).

        Raises:
            PromptError: empty prompt, or no room for a new token in the cache.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        n_prompt = len(prompt_ids)
        self.check_prompt(n_prompt)
        limit = min(max_new_tokens, self.lm.max_seq_len - n_prompt)
        device = self.program.device
        generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)
        batch = 1 if self.lm.independent_rows else self.lm.max_batch_size
        eos = set(self.lm.eos_token_ids)

        start = time.perf_counter()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device).expand(batch, -1)
        positions = torch.arange(n_prompt, dtype=torch.int64, device=device)
        token = self._choose(self._forward(ids.contiguous(), positions), sampling, generator)
        first = last = time.perf_counter()
        new = [token]
        if on_token is not None:
            on_token(token)
        while len(new) < limit and token not in eos:
            step_ids = torch.full((batch, 1), token, dtype=torch.int64, device=device)
            step_pos = torch.tensor([n_prompt + len(new) - 1], dtype=torch.int64, device=device)

            def step(ids: torch.Tensor = step_ids, pos: torch.Tensor = step_pos) -> int:
                return self._choose(self._forward(ids, pos), sampling, generator)

            token = step() if profiler is None else profiler.run(step)
            last = time.perf_counter()
            new.append(token)
            if on_token is not None:
                on_token(token)
        self.last_stats = GenerationStats(n_prompt, len(new), first - start, last - first)
        return new

    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | Sequence[SamplingConfig] = GREEDY,
        ignore_eos: bool = False,
        on_event: Callable[[TokenEvent], None] | None = None,
    ) -> list[list[int]]:
        """Generate for every prompt at once (continuous batching over the artifact's ``max_batch_size``
        slots; more prompts wait for a free slot); return each prompt's new ids (EOS included).

        Each prompt's tokens are those :meth:`generate` gives it alone (up to floating-point summation
        order). ``sampling`` is one config for all prompts or one per prompt; every rank must call this
        with the same arguments. ``on_event`` sees every token as the ranks agree on it
        (``TokenEvent.request`` is the prompt's index).

        Raises:
            PromptError: an empty prompt, a prompt with no room for a new token in a slot, or an artifact
                compiled with ``--max-batch-size 1`` (one sequence at a time).
        """
        configs = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else list(sampling)
        if len(configs) != len(prompts):
            raise ValueError(f"{len(configs)} sampling configs for {len(prompts)} prompts")
        scheduler = Scheduler(BatchEngine(self), frozenset(self.lm.eos_token_ids))
        requests = [
            Request(tuple(p), max_new_tokens, c, ignore_eos) for p, c in zip(prompts, configs, strict=True)
        ]
        return run_to_completion(scheduler, requests, on_event)
