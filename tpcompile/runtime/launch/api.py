"""In-Python convenience API: run every rank of an artifact on named tensors, or answer one prompt.

Invariant: both functions validate what they can first (manifest, inputs), then always spawn ``tp``
fresh local worker processes (also when called from inside a distributed job) through
:func:`~tpcompile.runtime.launch.launcher.run_ranks`, and return only after they all exited; nothing is
streamed, rank 0's result comes back through a temporary file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format import load_artifact_manifest
from ..lm.prompts import not_a_causal_lm
from ..lm.sampling import SamplingConfig
from ..lm.session import Generation, GenerationArgs
from ..load.tensor_io import order_inputs
from .args import DEFAULT_TIMEOUT_S, WorkerArgs
from .launcher import run_ranks

__all__ = ["generate_text", "run_artifact"]


def run_artifact(
    artifact_dir: str | Path,
    inputs: Mapping[str, torch.Tensor],
    *,
    backend: str | None = None,
    device: str | None = None,
    port: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    verify: bool = True,
    env: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Run every rank of ``artifact_dir`` on ``inputs`` in local subprocesses.

    Inputs are validated against the manifest first, written to a temporary
    safetensors file and read by ``tp`` spawned workers; rank 0's outputs are
    returned on CPU, keyed and ordered as in the manifest.

    Raises:
        ManifestError, InputError: before anything is launched.
        LaunchError: a rank failed; the message names the rank and its error.
    """
    root = Path(artifact_dir)
    manifest = load_artifact_manifest(root, verify=verify)
    ordered = order_inputs(manifest.inputs, inputs, manifest.symbols)
    with tempfile.TemporaryDirectory(prefix="tprun-") as tmp:
        in_path = Path(tmp) / "inputs.safetensors"
        out_path = Path(tmp) / "outputs.safetensors"
        tensors = {
            spec.name: t.detach().to("cpu", copy=True).contiguous()
            for spec, t in zip(manifest.inputs, ordered, strict=True)
        }
        save_file(tensors, str(in_path))
        args = WorkerArgs(
            artifact=root,
            inputs=in_path,
            output=out_path,
            backend=backend,
            device=device,
            skip_verify=not verify,
            timeout_s=timeout_s,
        )
        run_ranks(args, manifest.tp, port, env=env, result=out_path)
        result = load_file(str(out_path))
    return {name: result[name] for name in manifest.output_names}


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
    manifest = load_artifact_manifest(root, verify=verify)
    if not manifest.is_causal_lm:
        raise not_a_causal_lm(manifest)
    with tempfile.TemporaryDirectory(prefix="tprun-gen-") as tmp:
        results = Path(tmp) / "results.json"
        generation = GenerationArgs(
            prompts=(prompt,) if isinstance(prompt, str) else (),
            prompt_ids=() if isinstance(prompt, str) else (tuple(int(t) for t in prompt),),
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, seed),
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
        run_ranks(args, manifest.tp, port, env=env, result=results)
        record = json.loads(results.read_text(encoding="utf-8"))[0]
    return Generation.from_record(record)
