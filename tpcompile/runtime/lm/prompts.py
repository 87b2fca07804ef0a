"""Prompt text from files and stdin, checked before a tokenizer sees it.

A prompt is UTF-8 text: undecodable bytes, or control characters other than tab, line feed and carriage
return (a NUL byte: binary data), are refused with one line that says where.  ``tprun`` reads a
``--prompt-file`` and a non-terminal stdin (a pipe, a file) here, whole, before any rank starts; a
terminal's lines (and stdin under torchrun) are checked one by one as rank 0 reads them.

Invariant: every prompt text that reaches a tokenizer passed :func:`prompt_text`.  No torch, no tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from ..errors import InputError, ManifestError, first_line
from ..format import Manifest

__all__ = ["MAX_STDIN_BYTES", "not_a_causal_lm", "prompt_text", "read_prompt_file", "spool_stdin"]

#: The most stdin ``tprun`` reads ahead of the ranks (prompts, not a data stream).
MAX_STDIN_BYTES = 64 << 20
_ALLOWED_CONTROLS = frozenset("\t\n\r")


def prompt_text(data: bytes, what: str) -> str:
    """``data`` as text, or :class:`InputError` naming ``what`` (``prompt file F``, ``stdin line 3``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    for offset, char in enumerate(text):
        if (char < " " or char == "\x7f") and char not in _ALLOWED_CONTROLS:
            raise InputError(f"{what} is binary data, not text (character {ord(char):#04x} at {offset})")
    return text


def read_prompt_file(path: Path) -> str:
    """The whole file as one prompt, without its final newline."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path}: {first_line(exc)}") from exc
    text = prompt_text(data, f"prompt file {path}")
    return text.removesuffix("\n").removesuffix("\r")


def spool_stdin(source: IO[bytes], spool: IO[bytes], limit: int = MAX_STDIN_BYTES) -> int:
    """Copy ``source`` to ``spool`` line by line, each line checked as a prompt; return the line count.

    Raises:
        InputError: a line is not text (``stdin line N is ...``), or stdin holds more than ``limit`` bytes.
    """
    total = lines = 0
    while line := source.readline(limit + 1 - total):
        total += len(line)
        if total > limit:
            raise InputError(f"stdin holds more than {limit >> 20} MiB of prompts; pass them in several runs")
        lines += 1
        prompt_text(line, f"stdin line {lines}")
        spool.write(line)
    spool.flush()
    return lines


def not_a_causal_lm(manifest: Manifest) -> ManifestError:
    """The error for ``--prompt``/stdin prompts on an artifact that is not a causal LM."""
    return ManifestError(
        f"{manifest.path} is a '{manifest.kind}' artifact, not a causal LM: text prompts need an artifact "
        "compiled as a causal LM; run this one with --inputs IN.safetensors -o OUT.safetensors"
    )
