"""The artifact contract: what tpcompile writes and ``tprun`` reads, defined once for both.

* :mod:`.placement` -- placement values (``Replicate``, ``Partial``, ``Shard``, ``Pieces``) and their text;
* :mod:`.manifest` -- the manifest schema (``Manifest`` and its entries), ``to_json`` and the validating
  :func:`load_artifact_manifest`, and the checks of the files it lists;
* :mod:`.lm` and :mod:`.onnx_section` -- the LM and ONNX sections of ``extra``;
* :mod:`.integrity` -- sha256 of files and of the manifest, and tpcompile's working-directory names.

Invariant: standard library only (no torch), so that the compiler's writer and any reader can import it
cheaply; everything here is plain data and checks on it.
"""

from __future__ import annotations

from .integrity import MANIFEST_DIGEST_FIELD, WORK_DIR_PATTERN, manifest_digest, sha256_file, work_dir_name
from .lm import CAUSAL_LM, ROW_INPUT_NAMES, SHARED_INPUT_NAMES, LMInfo, parse_lm_info
from .manifest import (
    FORMAT_ONNX,
    FORMAT_TORCH,
    FORMAT_VERSION,
    GENERIC,
    MANIFEST_NAME,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    CollectiveEntry,
    Manifest,
    ParameterEntry,
    RankEntry,
    SymbolRange,
    TensorSpec,
    load_artifact_manifest,
    verify_artifact,
    verify_rank_files,
    verify_shared_files,
)
from .onnx_section import (
    STATE_IN,
    STATE_OUT,
    Collective,
    OnnxRank,
    Segment,
    ValueSpec,
    artifact_format,
    onnx_rank,
)
from .placement import Placement, Replicate, Shard  # the rest of the algebra: import .placement

__all__ = [
    "CAUSAL_LM",
    "FORMAT_ONNX",
    "FORMAT_TORCH",
    "FORMAT_VERSION",
    "GENERIC",
    "MANIFEST_DIGEST_FIELD",
    "MANIFEST_NAME",
    "PROGRAM_FILE",
    "STATE_IN",
    "STATE_OUT",
    "WEIGHTS_FILE",
    "WORK_DIR_PATTERN",
    "Collective",
    "CollectiveEntry",
    "LMInfo",
    "ROW_INPUT_NAMES",
    "SHARED_INPUT_NAMES",
    "Manifest",
    "OnnxRank",
    "ParameterEntry",
    "Placement",
    "RankEntry",
    "Replicate",
    "Segment",
    "Shard",
    "SymbolRange",
    "TensorSpec",
    "ValueSpec",
    "artifact_format",
    "load_artifact_manifest",
    "manifest_digest",
    "onnx_rank",
    "parse_lm_info",
    "sha256_file",
    "verify_artifact",
    "verify_rank_files",
    "verify_shared_files",
    "work_dir_name",
]
