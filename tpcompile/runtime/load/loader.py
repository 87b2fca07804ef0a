"""Loading one rank of an artifact into a runnable :class:`~tpcompile.runtime.load.program.RankProgram`.

Invariant: nothing is executed from an artifact whose files do not match the manifest (unless
verification is skipped) or whose program archive would unpickle data (unless ``trust_pickle``); every
failure is one typed, one-line error.  ONNX-format ranks are handed to :mod:`tpcompile.runtime.onnx`
(imported only then, with onnxruntime).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from ..errors import (
    ArtifactCorrupt,
    ArtifactLoadError,
    BackendError,
    and_more,
    first_line,
)
from ..format import (
    FORMAT_ONNX,
    MANIFEST_NAME,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    Manifest,
    artifact_format,
    load_artifact_manifest,
    verify_rank_files,
    verify_shared_files,
)
from ..format.native_section import native_section
from ..format.quant_section import quant_section
from ..kernels.native import load_native
from .graph_reader import program_module
from .graph_rewrite import rewrite_devices
from .program import RankProgram
from .program_archive import check_program_trust
from .quantized import bind_packed_weights
from .weights import assign_tensors, create_zero_state, move_to_device, unloaded_tensors

__all__ = ["load_rank"]

_CPU = torch.device("cpu")


def _register_collective_kernels() -> None:
    """Import the module that registers ``_c10d_functional`` kernels."""
    if not dist.is_available():
        raise BackendError(
            "this torch build has no torch.distributed support; install a standard torch build"
        )
    import torch.distributed._functional_collectives  # noqa: F401


def _load_module(manifest: Manifest, path: Path, rel: str, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        check_program_trust(path, rel)
    try:
        return program_module(path)  # the graph alone, ~10x sooner (torch only for archives it leaves)
    except Exception as exc:
        hint = ""
        if manifest.torch_version and manifest.torch_version != torch.__version__:
            hint = f" (artifact built with torch {manifest.torch_version}, running torch {torch.__version__})"
        raise ArtifactLoadError(f"cannot load {rel}: {first_line(exc)}{hint}") from exc


def _load_weights(path: Path, rel: str, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises several unrelated types
        raise ArtifactLoadError(f"cannot read {rel}: {first_line(exc)}") from exc


def _default_group_name() -> str | None:
    if dist.is_available() and dist.is_initialized() and dist.group.WORLD is not None:
        return dist.group.WORLD.group_name
    return None


def load_rank(
    artifact_dir: str | Path,
    rank: int,
    device: torch.device | str = _CPU,
    group_name: str | None = None,
    verify: bool = True,
    *,
    manifest: Manifest | None = None,
    trust_pickle: bool = False,
    native: bool = True,
) -> RankProgram:
    """Load rank ``rank`` of the artifact in ``artifact_dir`` onto ``device``.

    Args:
        artifact_dir: directory holding ``manifest.json`` and the rank dirs.
        rank: which rank's program/weights to load.
        device: run device; weights are loaded straight onto it.
        group_name: live process-group name for the collectives.  ``None``
            uses the default (WORLD) group if one is initialised, otherwise the
            collectives are left unbound (call :meth:`RankProgram.bind_group`).
        verify: check file hashes (the rank's files and the shared files) first.
        manifest: an already-loaded manifest for ``artifact_dir`` (optional).
        trust_pickle: load a program archive even if it holds pickled data or compiled code
            (by default such an archive is refused with :class:`UntrustedContent`).
        native: bind the rank's native program when the artifact has one this host can run
            (``extra.native``; why not is left in ``native_unused``, see ``kernels.native.settle_native``);
            its collectives then need ``kernels.compiled.bind_transport``.

    Buffers listed in the manifest's ``zero_state`` (KV caches) are not read
    from the weights file but created as zeros on ``device``.

    Raises:
        ManifestError, ArtifactCorrupt, ArtifactLoadError (UntrustedContent), BackendError.
    """
    root = Path(artifact_dir)
    man = manifest if manifest is not None else load_artifact_manifest(root, verify=verify)
    dev = torch.device(device)
    entry = man.rank_entry(rank)
    if verify:
        verify_shared_files(man)
        verify_rank_files(root, entry)
    if artifact_format(man) == FORMAT_ONNX:  # segments run by onnxruntime
        from ..onnx.program import load_onnx_rank

        return load_onnx_rank(man, rank, dev, group_name if group_name is not None else _default_group_name())
    rank_dir = root / entry.dir
    for name in (PROGRAM_FILE, WEIGHTS_FILE):
        if not (rank_dir / name).is_file():
            raise ArtifactCorrupt(f"artifact incomplete: {entry.relpath(name)} is missing")

    _register_collective_kernels()
    module = _load_module(man, rank_dir / PROGRAM_FILE, entry.relpath(PROGRAM_FILE), trust_pickle)
    weights_rel = entry.relpath(WEIGHTS_FILE)
    tensors = _load_weights(rank_dir / WEIGHTS_FILE, weights_rel, dev)
    quant = quant_section(man.extra, str(root / MANIFEST_NAME))
    if quant is not None:  # packed weights: bound to quantized-weight ops (runtime/load/quantized.py)
        bind_packed_weights(module, tensors, quant, weights_rel)
    assign_tensors(module, tensors, weights_rel)
    create_zero_state(module, man.zero_state, dev)
    missing = unloaded_tensors(module)
    if missing:
        more = and_more(missing)
        raise ArtifactLoadError(f"weights for {missing[0]} missing in {weights_rel}{more}")
    move_to_device(module, dev)
    rewrite_devices(module, dev)

    program = RankProgram(man, rank, dev, module, man.group_name)
    section = native_section(man.extra, str(root / MANIFEST_NAME))
    if native and section is not None and rank in section.files:
        package = rank_dir / section.files[rank]
        if section.files[rank] not in entry.files:
            raise ArtifactCorrupt(f"artifact corrupt: {entry.relpath(section.files[rank])} is not listed")
        program.native, program.native_unused = load_native(package, module, section, dev)
    live = group_name if group_name is not None else _default_group_name()
    if live is not None:
        program.bind_group(live)
    return program
