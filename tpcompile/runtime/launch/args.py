"""The description of one run, shared by ``tprun``, the worker and the Python API, and its JSON form.

``tprun`` (or ``run_artifact`` / ``generate_text``) builds a :class:`WorkerArgs` and either hands it to
the worker directly (under torchrun) or sends it to every spawned rank as one JSON argument
(:meth:`WorkerArgs.to_json`, read back by :meth:`WorkerArgs.from_json`).  Invariant:
``WorkerArgs.from_json(args.to_json()) == args`` up to paths being made absolute; the dataclass fields
alone define the JSON form, so nothing mirrors them by hand.  A run either maps tensors
(``inputs``/``output`` set), generates text (``generation`` set) or serves requests (``serve`` set).
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, first_line
from ..lm.options import GenerationArgs
from ..serve.options import ServeArgs

__all__ = ["BACKEND_CHOICES", "DEFAULT_TIMEOUT_S", "WorkerArgs"]

BACKEND_CHOICES = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a rank needs to know about one run."""

    artifact: Path
    inputs: Path | None = None
    output: Path | None = None
    backend: str | None = None
    device: str | None = None
    skip_verify: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    debug: bool = False
    generation: GenerationArgs | None = None
    trust_pickle: bool = False
    native: bool = True  # run the artifact's native programs where this host can
    serve: ServeArgs | None = None  # tprun serve: the ranks answer requests (tpcompile.runtime.serve)
    cpu_bind: str = "auto"  # pin each local rank to its own cores (tpcompile.runtime.cpu_bind)

    def to_json(self) -> str:
        """One-line JSON of every field (paths absolute), as the worker's single argument."""
        return json.dumps(_encode(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerArgs:
        """Inverse of :meth:`to_json`.

        Raises:
            InputError: ``text`` is not the JSON of a :class:`WorkerArgs`.
        """
        try:
            args: WorkerArgs = _decode(cls, json.loads(text))
        except (ValueError, TypeError) as exc:
            raise InputError(f"invalid worker arguments: {first_line(exc)}") from exc
        return args


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(hint: Any, value: Any) -> Any:
    """``value`` (JSON data) as the type ``hint`` of a dataclass field: dataclasses, paths, tuples,
    optional values and plain JSON scalars."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return tuple(_decode(args[0], v) for v in value)
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {hint.__name__}, got {value!r}")
        names = {f.name for f in fields(hint)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{hint.__name__} has no field(s) {', '.join(unknown)}")
        hints = typing.get_type_hints(hint)
        return hint(**{k: _decode(hints[k], v) for k, v in value.items()})
    if hint is Path:
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"expected {hint.__name__}, got {value!r}")
    return value
