"""What loading a ``program.pt2`` would execute: refuse archives that need unpickling unless trusted.

``torch.export.load`` reads a PT2 archive mostly as JSON and raw tensor bytes, but some entries are
unpickled (example inputs: ``torch.load`` with ``weights_only=True`` and, if that fails, *without* it;
tensor-subclass weights and constants; custom and opaque objects; the legacy formats) and AOTInductor
entries load a compiled shared library.  :func:`unsafe_content` inspects the archive with ``zipfile``
and an allowlist of entries, without loading anything, and names the first entry that would run code.
tpcompile writes programs without any such entry (its example inputs are empty).

:func:`check_artifact` is everything about an artifact's files that can fail before a rank starts (the
hashes, then this check); the ``tprun`` launcher runs it once, and this module does not import torch.

Invariant: inspecting an archive never unpickles or executes anything from it, and prints nothing.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ArtifactLoadError, UntrustedContent, first_line
from ..format import FORMAT_TORCH, PROGRAM_FILE, Manifest, artifact_format, verify_artifact

__all__ = ["check_artifact", "check_program_trust", "unsafe_content"]

_PLAIN_FILES = {"archive_format", "archive_version", "byteorder"}
_SAMPLE_INPUTS_DIR = "data/sample_inputs/"
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_AOTI_DIR = "data/aotinductor/"
_RAW_WEIGHT_PREFIX = "weight_"
_RAW_CONSTANT_PREFIX = "tensor_"


def _relative(name: str) -> str:
    """Entry name below the archive's root folder (``program/models/model.json`` -> ``models/model.json``)."""
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 else name


def _plain_tensors(data: bytes) -> bool:
    """True when ``data`` unpickles under ``torch.load(weights_only=True)``, the restricted unpickler.

    Whatever torch warns about while reading (a pickle protocol it does not expect, ...) is dropped: the
    verdict is reported, once, by the caller."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)  # exactly torch.export.load's first attempt
    except Exception:
        return False
    return True


def _payload_problem(rel: str, text: str, raw_prefix: str) -> str | None:
    """Check a ``*_config.json`` payload table: every entry must be raw tensor bytes, not a pickle."""
    try:
        config: Any = json.loads(text)
        entries = config["config"]
        items = entries.items()
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"an unreadable payload table {rel}"
    for fqn, meta in items:
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            return f"a pickled tensor ({fqn!r} in {rel})"
        path_name = meta.get("path_name")
        if not isinstance(path_name, str) or not path_name.startswith(raw_prefix):
            return f"a pickled object ({fqn!r} in {rel})"
    return None


def _entry_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    rel = _relative(info.filename)
    name = PurePosixPath(rel).name
    if info.is_dir() or rel in _PLAIN_FILES or rel.startswith(".data/") or rel.startswith("extra/"):
        return None
    if rel.startswith("models/") and rel.endswith(".json"):
        return None
    if rel.startswith(_SAMPLE_INPUTS_DIR):
        if info.file_size == 0 or _plain_tensors(archive.read(info)):
            return None
        return f"pickled example inputs ({rel}) that are not plain tensors"
    if rel.startswith(_WEIGHTS_DIR) and name.endswith("_weights_config.json"):
        return _payload_problem(rel, archive.read(info).decode("utf-8", "replace"), _RAW_WEIGHT_PREFIX)
    if rel.startswith(_CONSTANTS_DIR) and name.endswith("_constants_config.json"):
        return _payload_problem(rel, archive.read(info).decode("utf-8", "replace"), _RAW_CONSTANT_PREFIX)
    if rel.startswith(_WEIGHTS_DIR) and name.startswith(_RAW_WEIGHT_PREFIX):
        return None
    if rel.startswith(_CONSTANTS_DIR) and name.startswith(_RAW_CONSTANT_PREFIX):
        return None
    if rel.startswith(_AOTI_DIR):
        return f"AOTInductor compiled code ({rel})"
    if rel.endswith(".pt") or rel.endswith(".pkl"):
        return f"a pickle ({rel})"
    return f"an unexpected entry ({rel})"


def unsafe_content(path: str | Path) -> str | None:
    """Describe the first entry of the PT2 archive ``path`` whose loading would unpickle or run code.

    Returns ``None`` when ``torch.export.load`` would read only JSON and raw tensor bytes (and, at
    most, example inputs that the restricted ``weights_only=True`` unpickler accepts).

    Raises:
        OSError, zipfile.BadZipFile: ``path`` cannot be read as a zip archive.
    """
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        rels = {_relative(i.filename) for i in infos}
        if "archive_format" not in rels or not any(r.startswith("models/") for r in rels):
            return "an old torch.export format that is loaded by unpickling"
        for info in infos:
            problem = _entry_problem(archive, info)
            if problem is not None:
                return problem
    return None


def check_program_trust(path: Path, rel: str) -> None:
    """Refuse a program archive whose loading would unpickle data or load compiled code.

    Raises:
        UntrustedContent: naming the entry; ``--trust-pickle`` (``trust_pickle=True``) skips this check.
        ArtifactLoadError: the file is not a zip archive.
    """
    try:
        problem = unsafe_content(path)
    except Exception as exc:  # zipfile raises BadZipFile, OSError, ValueError, ...
        raise ArtifactLoadError(f"cannot load {rel}: {first_line(exc)}") from exc
    if problem is not None:
        raise UntrustedContent(
            f"{rel} contains {problem}, which runs code when loaded; pass --trust-pickle only if you "
            "trust where the artifact comes from (or recompile it with tpcompile)"
        )


def check_artifact(manifest: Manifest, *, verify: bool = True, trust_pickle: bool = False) -> None:
    """Everything about the files that can fail before any rank starts: hashes, then program trust.

    ``tprun`` runs this once in the launcher, so a corrupt or untrusted artifact is one error line
    and no rank is spawned.

    Raises:
        ArtifactCorrupt, UntrustedContent, ArtifactLoadError.
    """
    if verify:
        verify_artifact(manifest)
    if not trust_pickle and artifact_format(manifest) == FORMAT_TORCH:  # ONNX segments hold no pickles
        for entry in manifest.ranks:
            check_program_trust(manifest.path / entry.dir / PROGRAM_FILE, entry.relpath(PROGRAM_FILE))
