"""Which weights a rank shard stores packed (in their quantized block format), how each rank's packed slice
is read, and what the manifest says about them (``extra.quant``, see ``runtime/format/quant_section.py``).

Invariants: a weight is stored packed only when the source holds it in a format with a kernel (or
``--quantize`` offers it, ``frontend/quantize.py``) and its placement slices whole rows or whole blocks
(the plan made row-parallel cuts fall on block boundaries); everything else is stored as floats and is
named in a warning (with the bytes it costs, if the source held it quantized). A rank's packed slice is
read from the source without decoding anything (``--quantize``: quantized from the float slice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tpcompile.artifact.program import StoredTensor
from tpcompile.frontend.capture import CapturedModel
from tpcompile.runtime.errors import and_more
from tpcompile.runtime.format import Manifest
from tpcompile.runtime.format.placement import Replicate, RootPlacement, Shard
from tpcompile.runtime.format.quant_section import (
    COMPILE_FORMATS,
    PACKED_SUFFIX,
    QuantFormat,
    QuantSection,
    QuantTensor,
)


@dataclass
class PackedWeights:
    formats: dict[str, QuantFormat]  # stored name -> format, for the weights stored packed
    roots: dict[str, RootPlacement]
    read_packed: Callable[[str, int, int, int], torch.Tensor] | None
    shapes: dict[str, tuple[int, int]]  # global [rows, cols]
    keys: dict[str, str] = field(default_factory=dict)  # shard key -> stored name

    def __post_init__(self) -> None:
        self.keys = {name + PACKED_SUFFIX: name for name in self.formats}

    def spec(self, name: str, local: tuple[int, ...]) -> tuple[str, torch.dtype, tuple[int, ...]]:
        """The shard entry (key, dtype, shape) of a packed weight whose local logical shape is ``local``."""
        rows, cols = local
        return name + PACKED_SUFFIX, torch.uint8, (rows, self.formats[name].packed_cols(cols))

    def read(self, name: str, rank: int) -> torch.Tensor:
        assert self.read_packed is not None
        pl = self.roots[name]
        if isinstance(pl, Shard):
            return self.read_packed(name, pl.dim % 2, pl.offset(rank), pl.sizes[rank])
        return self.read_packed(name, 0, 0, self.shapes[name][0])

    def section(self, stored: list[list[StoredTensor]], dequantized: dict[str, str]) -> QuantSection:
        local = [{t.name: t.shape for t in tensors} for tensors in stored]
        tensors = {}
        for name, fmt in self.formats.items():
            sizes = []
            for shapes in local:
                rows, cols = shapes[name]
                sizes.append(rows * fmt.packed_cols(cols))
            tensors[name] = QuantTensor(fmt, tuple(sizes))
        return QuantSection(tensors, dequantized)


def packed_weights(captured: CapturedModel, roots: dict[str, RootPlacement]) -> PackedWeights:
    """The weights of ``captured`` to store packed under the placements ``roots``."""
    shapes = {}
    formats = {}
    for node, name in captured.state_names().items():
        fmt = captured.packed.get(name)
        if fmt is None:
            continue
        rows, cols = (int(s) for s in node.meta["val"].shape)
        pl = roots[name]
        whole_rows = isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim % 2 == 0)
        whole_blocks = (
            isinstance(pl, Shard)
            and pl.dim % 2 == 1
            and all(
                pl.sizes[r] % fmt.block == 0 and pl.offset(r) % fmt.block == 0 for r in range(len(pl.sizes))
            )
        )
        if whole_rows or whole_blocks:
            formats[name] = fmt
            shapes[name] = (rows, cols)
    return PackedWeights(formats, roots, captured.read_packed, shapes)


def describe_packed(
    manifest: Manifest, packed: PackedWeights, stored: list[list[StoredTensor]], captured: CapturedModel
) -> None:
    """Record the packed weights (``extra.quant``), fix the total weight bytes, warn about the quantized
    source tensors stored as floats."""
    float_bytes = {
        name: node.meta["val"].numel() * node.meta["val"].element_size()
        for node, name in captured.state_names().items()
    }
    unpacked = {name: kind for name, (kind, _) in captured.unpacked.items()}
    left = {name: fmt for name, fmt in captured.packed.items() if name not in packed.formats}
    unpacked.update({name: fmt.value for name, fmt in left.items() if fmt not in COMPILE_FORMATS})
    floats = sorted(name for name, fmt in left.items() if fmt in COMPILE_FORMATS)
    if floats:  # --quantize: their placement slices neither whole rows nor whole blocks
        more = and_more(floats)
        manifest.warnings.append(
            f"{len(floats)} weights stay floats: their placement does not cut them in whole rows or "
            f"quantization blocks: {floats[0]}{more}"
        )
    if not packed.formats and not unpacked:
        return
    section = packed.section(stored, unpacked)
    manifest.extra["quant"] = section.to_json()
    for name, t in section.tensors.items():
        whole = packed.shapes[name][0] * t.format.packed_cols(packed.shapes[name][1])
        manifest.total_weight_bytes += whole - float_bytes[name]
    if unpacked:
        names = sorted(unpacked)
        extra = sum(float_bytes.get(n, 0) - captured.unpacked.get(n, ("", 0))[1] for n in names)
        kinds = ", ".join(sorted(set(unpacked.values())))
        more = and_more(names)
        manifest.warnings.append(
            f"{len(names)} quantized tensors ({kinds}) have no kernel and are stored dequantized: "
            f"{names[0]}{more}, {extra / 2**20:.1f} MiB more than in the source "
            "(tpcompile explain lists them)"
        )
