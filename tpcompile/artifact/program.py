"""Turn rank r's graph into a self-contained ExportedProgram whose stored tensors are meta tensors.

Invariant: the saved ``program.pt2`` carries no weight data; its parameters and buffers have rank r's local
shapes and the fully-qualified names under which ``weights.safetensors`` stores them. Dynamic input dims
keep the ranges of the original program.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.distributed._functional_collectives  # noqa: F401  (fake kernels for re-tracing collectives)
import torch.fx as fx
from torch.export import Dim, ExportedProgram
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.symbol import SymT, symbol_is_type
from torch.utils._sympy.value_ranges import ValueRanges

from tpcompile.artifact.writer import writing
from tpcompile.errors import UnsupportedModelError
from tpcompile.runtime.errors import first_line


@dataclass(frozen=True)
class StoredTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool


def _hint(size: Any, lower: int, upper: int | None) -> int:
    if isinstance(size, int):
        return size
    hint = size.node.hint if isinstance(size, torch.SymInt) else None
    if hint is not None:
        return int(hint)
    guess = max(lower, 2)
    return guess if upper is None else min(guess, upper)


def symbol_range(program: ExportedProgram, expr: sympy.Expr) -> tuple[int, int | None]:
    """The sizes the program was exported for in a symbolic dim: (min, max), max None when unbounded."""
    rng = program.range_constraints.get(expr)
    lower = int(rng.lower) if rng is not None and rng.lower not in (-int_oo,) else 0
    upper = int(rng.upper) if rng is not None and rng.upper is not int_oo else None
    return max(lower, 0), upper


def input_symbols(program: ExportedProgram, inputs: list[fx.Node]) -> dict[str, tuple[int, int | None]]:
    """Every symbol that is an input dim (named as in the manifest's shapes, e.g. ``"s0"``) and its range."""
    return {
        str(s.node.expr): symbol_range(program, s.node.expr)
        for node in inputs
        for s in node.meta["val"].shape
        if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol)
    }


def input_signature(program: ExportedProgram, inputs: list[fx.Node]) -> tuple[list[torch.Tensor], Any]:
    """Example inputs and a dynamic_shapes spec reproducing the program's symbolic input dims."""
    dims: dict[str, Dim] = {}
    examples: list[torch.Tensor] = []
    spec: list[dict[int, Dim] | None] = []
    for node in inputs:
        val = node.meta["val"]
        shape: list[int] = []
        per_input: dict[int, Dim] = {}
        for i, s in enumerate(val.shape):
            if isinstance(s, torch.SymInt) and not isinstance(s.node.expr, sympy.Integer):
                expr = s.node.expr
                lower, upper = symbol_range(program, expr)
                key = str(expr)
                if key not in dims:
                    name = "d_" + "".join(c if c.isalnum() else "_" for c in key)
                    dims[key] = Dim(name, min=lower, max=upper) if upper else Dim(name, min=lower)
                per_input[i] = dims[key]
                shape.append(_hint(s, lower, upper))
            else:
                shape.append(int(s))
        examples.append(torch.zeros(shape, dtype=val.dtype))
        spec.append(per_input or None)
    return examples, tuple(spec)


def _may_be_one(dynamic_shapes: Any) -> bool:
    """Whether some dynamic input dim accepts size 1 (or 0)."""
    if isinstance(dynamic_shapes, dict):
        return any(_may_be_one(v) for v in dynamic_shapes.values())
    if isinstance(dynamic_shapes, (list, tuple)):
        return any(_may_be_one(v) for v in dynamic_shapes)
    return isinstance(dynamic_shapes, Dim) and getattr(dynamic_shapes, "min", 2) < 2


def drop_derived_value_bounds(program: ExportedProgram, dynamic_shapes: Any) -> int:
    """Remove the runtime checks of re-captured ``graph`` that bound only values read from data (unbacked
    symbols, e.g. ``first_slot``); returns how many.

    Re-capturing traces every dynamic size as "at least 2", so a check like ``first_slot + rows <= slots``
    yields the bound ``first_slot <= slots - 2``, which rejects valid calls with one row (the last KV-cache
    slot becomes unreachable). The original program's own checks that involve the sizes stay, and the ops
    that use the value (``narrow``) check their bounds when they run."""
    if not _may_be_one(dynamic_shapes):
        return 0
    graph, dropped = program.graph, 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten._assert_scalar.default:
            continue
        cond = node.args[0]
        value = cond.meta.get("val") if isinstance(cond, fx.Node) else None
        expr = getattr(getattr(value, "node", None), "expr", None)
        if expr is None or not expr.free_symbols:
            continue
        if all(symbol_is_type(sym, SymT.UNBACKED_INT) for sym in expr.free_symbols):
            graph.erase_node(node)
            dropped += 1
            for sym in expr.free_symbols:  # the bound no longer holds: keep only the lower one
                old = program.range_constraints.get(sym)
                if old is not None:
                    program.range_constraints[sym] = ValueRanges(old.lower, int_oo)
    if dropped:
        graph.eliminate_dead_code()
        program.graph_module.recompile()
    return dropped


def export_rank_program(
    graph: fx.Graph, stored: list[StoredTensor], example_inputs: list[torch.Tensor], dynamic_shapes: Any
) -> ExportedProgram:
    # Uninitialised CPU tensors: the graph's own factories make CPU tensors, and meta ones would not mix
    # with them. ``torch.empty`` does not touch its pages, so this costs address space, not memory.
    root: dict[str, Any] = {}
    for t in stored:
        empty = torch.empty(t.shape, dtype=t.dtype)
        root[t.name] = torch.nn.Parameter(empty, requires_grad=False) if t.is_parameter else empty
    gm = fx.GraphModule(root, graph)
    try:
        with torch.no_grad():
            program = torch.export.export(
                gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False
            )
        drop_derived_value_bounds(program, dynamic_shapes)
    except Exception as err:
        first = first_line(err)
        raise UnsupportedModelError(f"re-capturing a rank's program failed: {first}") from err
    state = program.state_dict
    for name, value in list(state.items()):
        meta = torch.empty_like(value, device="meta")
        state[name] = (
            torch.nn.Parameter(meta, requires_grad=False) if isinstance(value, torch.nn.Parameter) else meta
        )
    return program


def save_program(program: ExportedProgram, path: Path) -> None:
    """``torch.export.save`` with reproducible bytes: node provenance records (which hold Python object ids)
    are dropped, and the archive's random serialization id is replaced by a digest of its contents.

    The example inputs are dropped too: ``torch.export.save`` pickles them, and the runtime loads nothing
    that needs unpickling (without them the archive is JSON plus raw tensor bytes).

    The archive is built in memory (it holds no weights) and written by Python, so that a full disk is an
    ``OSError`` naming the file, not torch's zip writer failing (and aborting the process)."""
    for node in program.graph.nodes:
        node.meta.pop("from_node", None)
    program.example_inputs = None
    archive = io.BytesIO()
    torch.export.save(program, archive)
    with writing(path):
        path.write_bytes(archive.getbuffer())
    _fix_serialization_id(path)


_SERIALIZATION_ID = ".data/serialization_id"


def _fix_serialization_id(path: Path) -> None:
    """Rewrite the (stored, uncompressed) serialization-id record in place and patch its CRC-32 in the
    local header and in the central directory; the archive's layout is otherwise untouched."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        digest = hashlib.sha256()
        for info in infos:
            if not info.filename.endswith(_SERIALIZATION_ID):
                digest.update(info.filename.encode())
                digest.update(archive.read(info))
        central = archive.start_dir
    index = next((k for k, i in enumerate(infos) if i.filename.endswith(_SERIALIZATION_ID)), None)
    if index is None or infos[index].compress_type != zipfile.ZIP_STORED:
        return
    target = infos[index]
    new_id = str(int(digest.hexdigest(), 16)).zfill(target.file_size)[-target.file_size :].encode()
    crc = struct.pack("<I", zlib.crc32(new_id) & 0xFFFFFFFF)
    with path.open("r+b") as f:
        f.seek(target.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(target.header_offset + 14)  # local header: CRC-32
        f.write(crc)
        f.seek(target.header_offset + 30 + name_len + extra_len)
        f.write(new_id)
        pos = central
        for k in range(len(infos)):
            f.seek(pos)
            entry = f.read(46)
            if entry[:4] != b"PK\x01\x02":
                raise ValueError(f"{path}: unexpected zip central directory layout")
            if k == index:
                f.seek(pos + 16)  # central directory: CRC-32
                f.write(crc)
                break
            n, m, c = struct.unpack("<HHH", entry[28:34])
            pos += 46 + n + m + c
