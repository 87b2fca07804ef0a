"""In-Python convenience API: generate for one prompt with every rank of a causal-LM artifact.

Invariant: like :func:`~tpcompile.runtime.launch.api.run_artifact`, always spawns
``tp`` fresh local worker processes and returns only after they all exited;
nothing is streamed, the result comes back from rank 0 through a temporary
JSON file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LaunchError, PromptError
from ..format import load_artifact_manifest
from ..lm.generate import GenerationStats
from ..lm.session import not_a_causal_lm
from .args import DEFAULT_TIMEOUT_S, GenerationArgs, WorkerArgs
from .launcher import spawn_workers

__all__ = ["Generation", "generate_text"]


@dataclass(frozen=True)
class Generation:
    """One answer: decoded ``text`` ("" without a tokenizer), the ids and the timing of rank 0."""

    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    stats: GenerationStats


def generate_text(
    artifact_dir: str | Path,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat_template: bool = True,
    backend: str | None = None,
    device: str | None = None,
    port: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    verify: bool = True,
    env: Mapping[str, str] | None = None,
) -> Generation:
    """Launch all ranks of ``artifact_dir`` locally and answer ``prompt``.

    ``prompt`` is text (tokenized with the artifact's tokenizer, through its
    chat template when it has one and ``chat_template``) or a list of token
    ids used as is.  Greedy when ``temperature == 0``.

    Raises:
        ManifestError: the artifact is not a causal LM.
        PromptError: the prompt is empty or does not fit the KV cache.
        LaunchError: a rank failed.
    """
    root = Path(artifact_dir)
    manifest = load_artifact_manifest(root)
    if not manifest.is_causal_lm:
        raise not_a_causal_lm(manifest)
    with tempfile.TemporaryDirectory(prefix="tprun-gen-") as tmp:
        results = Path(tmp) / "results.json"
        is_text = isinstance(prompt, str)
        generation = GenerationArgs(
            prompts=(prompt,) if isinstance(prompt, str) else (),
            prompt_ids=() if is_text else (tuple(int(t) for t in prompt),),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            chat_template=chat_template,
            results_json=results,
            stream=False,
        )
        args = WorkerArgs(
            artifact=root,
            backend=backend,
            device=device,
            skip_verify=not verify,
            timeout_s=timeout_s,
            generation=generation,
        )
        outcome = spawn_workers(args.to_argv(), manifest.tp, port, env=env)
        if outcome.reported and outcome.message:
            raise PromptError(outcome.message)  # every rank rejected the prompt the same way
        if outcome.returncode != 0:
            raise LaunchError(outcome.message or f"workers failed with exit code {outcome.returncode}")
        if not results.is_file():
            raise LaunchError("workers exited successfully but rank 0 wrote no results")
        record = json.loads(results.read_text(encoding="utf-8"))[0]
    raw = record["stats"]
    stats = GenerationStats(
        prompt_tokens=raw["prompt_tokens"],
        new_tokens=raw["new_tokens"],
        time_to_first_token_s=raw["time_to_first_token_s"],
        decode_s=raw["decode_s"],
    )
    return Generation(record["text"], record["prompt_ids"], record["new_ids"], stats)
