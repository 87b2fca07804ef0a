"""Prompt encoding and incremental decoding with the tokenizer shipped in the artifact.

``transformers`` is imported lazily, only when a tokenizer is loaded.
Invariant of :class:`StreamDecoder`: the concatenation of everything it
returns equals ``tokenizer.decode(ids, skip_special_tokens=True)`` of the
tokens fed so far, except that text ending in an incomplete UTF-8 sequence
is held back until the next token completes it (or :meth:`StreamDecoder.finish`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ArtifactLoadError, InputError, first_line
from ..format import Manifest

__all__ = ["StreamDecoder", "encode_chat", "encode_prompt", "load_tokenizer", "tokenizer_dir"]

_REPLACEMENT = "\ufffd"


def tokenizer_dir(manifest: Manifest) -> Path:
    """The artifact's tokenizer directory.

    Raises:
        InputError: the artifact ships no tokenizer (only token ids can be used).
    """
    lm = manifest.lm
    if lm is None or lm.tokenizer is None:
        raise InputError(f"{manifest.path} ships no tokenizer; pass token ids through the Python API instead")
    return manifest.path / lm.tokenizer


def load_tokenizer(manifest: Manifest) -> Any:
    """``AutoTokenizer.from_pretrained`` on the artifact's tokenizer directory.

    Raises:
        InputError: the artifact ships no tokenizer (only token ids can be used).
        ArtifactLoadError: transformers is missing or the tokenizer cannot be loaded.
    """
    path = tokenizer_dir(manifest)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ArtifactLoadError("text prompts need the transformers package; install tpcompile[llm]") from exc
    try:
        # never the artifact's own Python code (auto_map), and no network: the files are all local
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        where = path.relative_to(manifest.path)
        raise ArtifactLoadError(f"cannot load the tokenizer in {where}: {first_line(exc)}") from exc


def _as_ids(encoded: Any) -> list[int]:
    """Token ids from whatever a tokenizer call returned (list, nested list or BatchEncoding)."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode_prompt(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """Token ids of ``text``: through the chat template (user turn + generation prompt) or plain.

    The plain form is ``tokenizer(text)["input_ids"]``, so BOS is added
    exactly when the tokenizer adds it.
    """
    if chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return _as_ids(tokenizer(text))


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation through the chat template, with the assistant's generation prompt.

    Raises:
        InputError: the template rejects the conversation (e.g. roles it does not know).
    """
    try:
        encoded = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as exc:
        raise InputError(f"cannot apply the chat template: {first_line(exc)}") from exc
    return _as_ids(encoded)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces safe to print as they come.

    Decodes a short window (from ``prefix`` to the end) and emits only what
    the newest tokens added to it, the way text-generation servers do, so the
    cost per token does not grow with the answer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def feed(self, token: int) -> str:
        """Add ``token``; return the text it completes (possibly empty)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def finish(self) -> str:
        """Whatever text is still held back (e.g. a dangling partial character)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""
