"""tpcompile runtime: load and run tensor-parallel artifacts written by tpcompile.

This sub-package is self-contained (it imports nothing else from tpcompile)
so that a deployment can ship only the runtime.  Its names are imported on
first use, so that ``import tpcompile.runtime.format`` (the artifact contract,
used by the compiler's writer) does not import torch.

Public API::

    load_artifact_manifest(artifact_dir) -> Manifest
    load_rank(artifact_dir, rank, device="cpu", group_name=None, verify=True) -> RankProgram
    run_artifact(artifact_dir, inputs, *, backend=None, device=None, ...) -> dict[str, Tensor]

Causal LMs (``kind == "causal_lm"``)::

    generate_text(artifact_dir, prompt, *, max_new_tokens=256, temperature=0.0, ...) -> Generation
    CausalLM.load(artifact_dir)  # in a rank (torchrun + init_process_group)
    CausalLM(load_rank(artifact_dir, 0))  # tp=1, no process group needed
    lm.generate(prompt_ids, max_new_tokens=..., temperature=..., on_token=...) -> list[int]

Invariant: the runtime imports nothing from the compiler, and no runtime module
imports another in a circle; each subpackage has one job (``format``, ``load``,
``onnx``, ``transport``, ``kernels``, ``lm``, ``launch``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .format import (
        LMInfo,
        Manifest,
        Placement,
        RankEntry,
        Replicate,
        Shard,
        TensorSpec,
        load_artifact_manifest,
        verify_rank_files,
        verify_shared_files,
    )
    from .launch.api import generate_text, run_artifact
    from .lm.generate import CausalLM, GenerationStats
    from .lm.options import SamplingConfig
    from .lm.session import Generation
    from .load.loader import load_rank
    from .load.program import RankProgram

#: Public name -> the module (relative to this package) that defines it.
_MODULES = {
    "ArtifactCorrupt": ".errors",
    "ArtifactLoadError": ".errors",
    "BackendError": ".errors",
    "InputError": ".errors",
    "LaunchError": ".errors",
    "ManifestError": ".errors",
    "PromptError": ".errors",
    "RuntimeArtifactError": ".errors",
    "LMInfo": ".format",
    "Manifest": ".format",
    "Placement": ".format",
    "RankEntry": ".format",
    "Replicate": ".format",
    "Shard": ".format",
    "TensorSpec": ".format",
    "load_artifact_manifest": ".format",
    "verify_rank_files": ".format",
    "verify_shared_files": ".format",
    "CausalLM": ".lm.generate",
    "GenerationStats": ".lm.generate",
    "Generation": ".lm.session",
    "generate_text": ".launch.api",
    "RankProgram": ".load.program",
    "load_rank": ".load.loader",
    "run_artifact": ".launch.api",
    "SamplingConfig": ".lm.options",
}

__all__ = [
    "ArtifactCorrupt",
    "ArtifactLoadError",
    "BackendError",
    "CausalLM",
    "Generation",
    "GenerationStats",
    "InputError",
    "LMInfo",
    "LaunchError",
    "Manifest",
    "ManifestError",
    "Placement",
    "PromptError",
    "RankEntry",
    "RankProgram",
    "Replicate",
    "RuntimeArtifactError",
    "SamplingConfig",
    "Shard",
    "TensorSpec",
    "generate_text",
    "load_artifact_manifest",
    "load_rank",
    "run_artifact",
    "verify_rank_files",
    "verify_shared_files",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
