"""Tensor sources: where a checkpoint's weights are read from, one tensor (or one slice) at a time.

Invariant: nothing here holds more than the tensor being read. ``read_slice(name, dim, start, length)``
equals ``read(name).narrow(dim, start, length)``; sources that can read a slice without the whole tensor
(safetensors) do so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from tpcompile.errors import UsageError
from tpcompile.runtime.errors import first_line


class TensorSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> torch.Tensor: ...


def read_slice(source: Any, name: str, dim: int, start: int, length: int) -> torch.Tensor:
    """A slice of one stored tensor, read without the rest when the source supports it."""
    sliced = getattr(source, "read_slice", None)
    if sliced is not None:
        return sliced(name, dim, start, length)
    return source.read(name).narrow(dim, start, length)


class SafetensorsCheckpoint:
    """The ``*.safetensors`` files of a Hugging Face checkpoint directory (one file, or shards listed by
    ``model.safetensors.index.json``)."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        files: list[Path]
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UsageError(f"{index} is not a valid safetensors index: {err}") from None
            files = sorted({directory / f for f in weight_map.values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UsageError(
                f"{directory} has no *.safetensors weights (only safetensors checkpoints are read)"
            )
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            if not path.is_file():
                raise UsageError(f"checkpoint shard {path} listed in the index does not exist")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        self._where[key] = path
                        self._shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as err:  # safetensors raises its own error types
                raise UsageError(f"cannot read {path}: {first_line(err)}") from None

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read_slice(self, name: str, dim: int, start: int, length: int) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as f:
            part = f.get_slice(name)
            index = tuple(slice(start, start + length) if i == dim else slice(None) for i in range(dim + 1))
            return part[index]
