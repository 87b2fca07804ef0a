"""In-Python convenience API: run a whole artifact on named tensors."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LaunchError
from ..format import load_artifact_manifest
from ..load.tensor_io import order_inputs
from .args import DEFAULT_TIMEOUT_S, WorkerArgs
from .launcher import spawn_workers

__all__ = ["run_artifact"]


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
    returned on CPU, keyed and ordered as in the manifest.  Always spawns
    fresh processes (also when called from inside a distributed job).

    Raises:
        ManifestError, InputError: before anything is launched.
        LaunchError: a rank failed; the message names the rank and its error.
    """
    root = Path(artifact_dir)
    manifest = load_artifact_manifest(root)
    ordered = order_inputs(manifest.inputs, inputs)
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
        outcome = spawn_workers(args.to_argv(), manifest.tp, port, env=env)
        if outcome.returncode != 0:
            raise LaunchError(outcome.message or f"workers failed with exit code {outcome.returncode}")
        if not out_path.is_file():
            raise LaunchError("workers exited successfully but rank 0 wrote no outputs")
        result = load_file(str(out_path))
    return {name: result[name] for name in manifest.output_names}
