"""Reading, validating and writing the named tensors a program consumes/produces.

Invariant: inputs reach a program only in manifest order, after every name, dtype, static
dimension and shared symbol was checked against the manifest, and every symbolic dimension against
the range the program was exported for (when the manifest records it); outputs are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError, ManifestError, RuntimeArtifactError, first_line
from ..format import SymbolRange, TensorSpec

__all__ = [
    "dtype_name",
    "order_inputs",
    "read_inputs",
    "torch_dtype",
    "write_outputs",
]


def torch_dtype(name: str) -> torch.dtype:
    """Map a manifest dtype name such as ``"bfloat16"`` to a ``torch.dtype``."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r} in manifest; upgrade the runtime or recompile")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`torch_dtype`: ``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _check_one(
    spec: TensorSpec,
    tensor: torch.Tensor,
    symbols: dict[str, tuple[int, str]],
    ranges: Mapping[str, SymbolRange],
) -> None:
    expected = torch_dtype(spec.dtype)
    if tensor.dtype != expected:
        raise InputError(
            f"input {spec.name!r} has dtype {dtype_name(tensor.dtype)} but the artifact expects {spec.dtype}"
        )
    shape = tuple(tensor.shape)
    if len(shape) != len(spec.shape):
        raise InputError(
            f"input {spec.name!r} has {len(shape)} dims {list(shape)} but the artifact expects "
            f"{len(spec.shape)} dims {list(spec.shape)}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, int):
            if want != got:
                raise InputError(
                    f"input {spec.name!r} has shape {list(shape)} but the artifact expects "
                    f"{list(spec.shape)} (dim {axis} must be {want})"
                )
        elif want in ranges and got not in ranges[want]:
            raise InputError(
                f"input {spec.name!r} dim {axis} is {got} but the artifact was compiled for "
                f"{ranges[want]} there (symbol {want})"
            )
        elif want in symbols and symbols[want][0] != got:
            size, owner = symbols[want]
            raise InputError(
                f"input {spec.name!r} dim {axis} is {got} but {want} is {size} in input {owner!r}; "
                "dimensions sharing a symbol must match"
            )
        else:
            symbols.setdefault(want, (got, spec.name))


def order_inputs(
    specs: Sequence[TensorSpec],
    tensors: Mapping[str, torch.Tensor],
    ranges: Mapping[str, SymbolRange] | None = None,
) -> list[torch.Tensor]:
    """Validate ``tensors`` against ``specs`` (and symbolic dims against ``ranges``, the manifest's
    ``symbols``) and return them in positional order.

    Raises:
        InputError: an input is missing or unexpected, or has the wrong dtype or shape, or a size outside
            the range of its symbolic dimension.
    """
    expected = [s.name for s in specs]
    listing = ", ".join(expected) if expected else "(none)"
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise InputError(f"missing input(s) {', '.join(missing)}; the artifact expects: {listing}")
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        raise InputError(f"unexpected input(s) {', '.join(extra)}; the artifact expects: {listing}")
    symbols: dict[str, tuple[int, str]] = {}
    for spec in specs:
        _check_one(spec, tensors[spec.name], symbols, ranges or {})
    return [tensors[s.name] for s in specs]


def read_inputs(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of the safetensors file ``path`` onto ``device``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"inputs file {p} does not exist")
    try:
        return load_file(str(p), device=str(device))
    except Exception as exc:  # safetensors raises several unrelated types
        raise InputError(f"cannot read inputs file {p}: {first_line(exc)}") from exc


def write_outputs(path: str | Path, specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor]) -> None:
    """Atomically write ``tensors`` to ``path`` named after ``specs`` (same order)."""
    if len(specs) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {len(specs)} output specs")
    named = {
        s.name: t.detach().to("cpu", copy=True).contiguous() for s, t in zip(specs, tensors, strict=True)
    }
    target = Path(path)
    if not target.parent.is_dir():
        raise RuntimeArtifactError(f"output directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        save_file(named, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
