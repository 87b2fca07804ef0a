"""What a text-generation run asks for: where its prompts come from and how tokens are chosen.

These are plain values, shared by ``tprun`` (which builds them from its options), the worker and the Python
API.  Invariant: standard library only, so that ``tprun`` can build and check them before torch is
imported; a :class:`SamplingConfig` that exists is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationArgs", "SamplingConfig"]

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens: ``temperature == 0`` is greedy; otherwise sample with ``seed``."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0.0


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
    sampling: SamplingConfig = SamplingConfig()
    chat_template: bool = True
    save_tokens: Path | None = None
    results_json: Path | None = None
    stream: bool = True
    compile_decode: bool = False
    profile: bool = False  # tprun --profile: each rank prints where its decode steps go
