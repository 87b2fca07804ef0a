"""tpcompile runtime: load and run tensor-parallel artifacts written by tpcompile.

This sub-package is self-contained (it imports nothing else from tpcompile)
so that a deployment can ship only the runtime.

Public API::

    load_artifact_manifest(artifact_dir) -> ArtifactManifest
    load_rank(artifact_dir, rank, device="cpu", group_name=None, verify=True) -> RankProgram
    run_artifact(artifact_dir, inputs, *, backend=None, device=None, ...) -> dict[str, Tensor]
"""

from __future__ import annotations

from .errors import (
    ArtifactCorrupt,
    ArtifactLoadError,
    BackendError,
    InputError,
    LaunchError,
    ManifestError,
    RuntimeArtifactError,
)
from .loader import RankProgram, load_rank
from .manifest import (
    ArtifactManifest,
    RankEntry,
    TensorSpec,
    load_artifact_manifest,
    verify_rank_files,
)
from .run import run_artifact

__all__ = [
    "ArtifactCorrupt",
    "ArtifactLoadError",
    "ArtifactManifest",
    "BackendError",
    "InputError",
    "LaunchError",
    "ManifestError",
    "RankEntry",
    "RankProgram",
    "RuntimeArtifactError",
    "TensorSpec",
    "load_artifact_manifest",
    "load_rank",
    "run_artifact",
    "verify_rank_files",
]
