"""tpcompile runtime: load and run tensor-parallel artifacts written by tpcompile.

This sub-package is self-contained (it imports nothing else from tpcompile)
so that a deployment can ship only the runtime.

Public API::

    load_artifact_manifest(artifact_dir) -> ArtifactManifest
    load_rank(artifact_dir, rank, device="cpu", group_name=None, verify=True) -> RankProgram
    run_artifact(artifact_dir, inputs, *, backend=None, device=None, ...) -> dict[str, Tensor]

Causal LMs (``kind == "causal_lm"``)::

    generate_text(artifact_dir, prompt, *, max_new_tokens=256, temperature=0.0, ...) -> Generation
    CausalLM.load(artifact_dir)  # in a rank (torchrun + init_process_group)
    CausalLM(load_rank(artifact_dir, 0))  # tp=1, no process group needed
    lm.generate(prompt_ids, max_new_tokens=..., temperature=..., on_token=...) -> list[int]
"""

from __future__ import annotations

from .errors import (
    ArtifactCorrupt,
    ArtifactLoadError,
    BackendError,
    InputError,
    LaunchError,
    ManifestError,
    PromptError,
    RuntimeArtifactError,
)
from .generate import CausalLM, GenerationStats
from .lm_api import Generation, generate_text
from .lm_info import LMInfo
from .loader import RankProgram, load_rank
from .manifest import (
    ArtifactManifest,
    RankEntry,
    TensorSpec,
    load_artifact_manifest,
    verify_rank_files,
    verify_shared_files,
)
from .placement import Placement
from .run import run_artifact
from .sampling import SamplingConfig

__all__ = [
    "ArtifactCorrupt",
    "ArtifactLoadError",
    "ArtifactManifest",
    "BackendError",
    "CausalLM",
    "Generation",
    "GenerationStats",
    "InputError",
    "LMInfo",
    "LaunchError",
    "ManifestError",
    "Placement",
    "PromptError",
    "RankEntry",
    "RankProgram",
    "RuntimeArtifactError",
    "SamplingConfig",
    "TensorSpec",
    "generate_text",
    "load_artifact_manifest",
    "load_rank",
    "run_artifact",
    "verify_rank_files",
    "verify_shared_files",
]
