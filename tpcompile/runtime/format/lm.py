"""The LM section of a manifest: the ``extra.lm`` block of a ``causal_lm`` artifact.

Invariant: an :class:`LMInfo` has ``vocab_size``, ``max_seq_len`` and
``max_batch_size`` >= 1 and integer token ids; the tokenizer path, when set,
is a plain relative path (that it stays inside the artifact once symlinks are
resolved is checked where the artifact's directory is known).  Standard
library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ManifestError
from .integrity import outside_artifact, plain_relative_path

__all__ = ["CAUSAL_LM", "ROW_INPUT_NAMES", "SHARED_INPUT_NAMES", "LMInfo", "parse_lm_info"]

CAUSAL_LM = "causal_lm"
#: Inputs of a causal-LM program whose rows share one position vector (``max_batch_size`` 1, and
#: artifacts compiled before independent rows existed).
SHARED_INPUT_NAMES = ("input_ids", "cache_position")
#: Inputs of a program with independent rows (``LMInfo.independent_rows``), in this order.
ROW_INPUT_NAMES = ("input_ids", "position_ids", "first_slot")


@dataclass(frozen=True)
class LMInfo:
    """What the runtime needs to drive a causal-LM artifact."""

    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer: str | None = None
    chat_template: bool = False
    generation: Mapping[str, Any] = field(default_factory=dict)
    model_type: str | None = None
    #: the program takes ``(input_ids, position_ids, first_slot)`` and serves ``max_batch_size`` unrelated
    #: rows, each with its own KV-cache slot and positions; otherwise ``(input_ids, cache_position)`` with
    #: one position vector shared by every row
    independent_rows: bool = False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ManifestError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _optional_id(data: Mapping[str, Any], key: str, where: str) -> int | None:
    value = data.get(key)
    if value is not None and not _is_int(value):
        raise ManifestError(f"{where}: '{key}' must be an integer or null, got {value!r}")
    return value


def _eos_ids(data: Mapping[str, Any], where: str) -> tuple[int, ...]:
    value = data.get("eos_token_ids", [])
    if _is_int(value):  # tolerate a bare id
        value = [value]
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise ManifestError(f"{where}: 'eos_token_ids' must be a list of integers, got {value!r}")
    return tuple(value)


def _flag(data: Mapping[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ManifestError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _tokenizer_dir(data: Mapping[str, Any]) -> str | None:
    value = data.get("tokenizer")
    if value is None:
        return None
    if not plain_relative_path(value):  # where it leads past symlinks: see load_artifact_manifest
        raise outside_artifact(value, "extra.lm.tokenizer")
    return str(value)


def parse_lm_info(extra: object, where: str) -> LMInfo:
    """Parse ``manifest["extra"]["lm"]``.

    Raises:
        ManifestError: the block is missing or a field has the wrong type (ManifestCorrupt: the
            tokenizer path is not a plain relative path).
    """
    lm = extra.get("lm") if isinstance(extra, Mapping) else None
    loc = f"{where}: extra.lm"
    if not isinstance(lm, Mapping):
        raise ManifestError(f"{where}: a causal_lm artifact needs an 'extra.lm' object; recompile it")
    generation = lm.get("generation") or {}
    if not isinstance(generation, Mapping):
        raise ManifestError(f"{loc}: 'generation' must be an object")
    return LMInfo(
        vocab_size=_positive(lm, "vocab_size", loc),
        max_seq_len=_positive(lm, "max_seq_len", loc),
        max_batch_size=_positive(lm, "max_batch_size", loc),
        eos_token_ids=_eos_ids(lm, loc),
        bos_token_id=_optional_id(lm, "bos_token_id", loc),
        pad_token_id=_optional_id(lm, "pad_token_id", loc),
        tokenizer=_tokenizer_dir(lm),
        chat_template=bool(lm.get("chat_template", False)),
        generation=dict(generation),
        model_type=lm["model_type"] if isinstance(lm.get("model_type"), str) else None,
        independent_rows=_flag(lm, "independent_rows", loc),
    )
