"""The ONNX section of a manifest (``format: "onnx"``, ``extra.onnx``): each rank's segments and collectives.

``extra.onnx.ranks[r]`` lists rank r's ONNX graph inputs and outputs (the program's user inputs, then one
``in.NAME`` per KV-cache buffer; the outputs ``out0...``, then one ``out.NAME`` per buffer) and its
``steps`` in execution order: ``segment`` (an ONNX file in the rank directory, the values it reads and
writes) or a collective (``all_reduce`` / ``all_gather``: one value in, one out). The section is read
when a rank is loaded (:func:`onnx_rank`), into the immutable values below. Invariant: a parsed
:class:`OnnxRank` lists only known step kinds with all their fields, and segment files named by plain
relative paths that stay inside the artifact, or reading fails with a ManifestError (ManifestCorrupt for
a path). Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ManifestError
from .integrity import artifact_path
from .manifest import FORMAT_ONNX, FORMAT_TORCH, Manifest

__all__ = [
    "STATE_IN",
    "STATE_OUT",
    "Collective",
    "OnnxRank",
    "Segment",
    "Step",
    "ValueSpec",
    "artifact_format",
    "onnx_rank",
]

STATE_IN = "in."
STATE_OUT = "out."


@dataclass(frozen=True)
class ValueSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Segment:
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: int = 0  # how many ONNX nodes it holds (informational)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "segment",
            "file": self.file,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather
    input: str
    output: str
    reduce_op: str = "sum"
    group_size: int = 1

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.op, "input": self.input, "output": self.output}
        if self.op == "all_reduce":
            data["reduce_op"] = self.reduce_op
        else:
            data["group_size"] = self.group_size
        return data


Step = Segment | Collective


@dataclass(frozen=True)
class OnnxRank:
    """Rank r's ONNX graph: its inputs and outputs, and its steps in execution order. ``to_json`` is what
    the compiler writes under ``extra.onnx.ranks[r]``; ``onnx_rank`` reads it back."""

    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    steps: tuple[Step, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": [v.to_json() for v in self.outputs],
            "steps": [step.to_json() for step in self.steps],
        }

    @property
    def state(self) -> tuple[ValueSpec, ...]:
        """The KV-cache inputs (``in.NAME``), in order."""
        return tuple(s for s in self.inputs if s.name.startswith(STATE_IN))

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.steps if isinstance(s, Segment))


def artifact_format(manifest: Manifest) -> str:
    """``"torch"`` (the default) or ``"onnx"``; ManifestError for anything else."""
    fmt = manifest.format
    if fmt not in (FORMAT_TORCH, FORMAT_ONNX):
        raise ManifestError(f"{manifest.path}: unknown artifact format {fmt!r}; upgrade tpcompile")
    return str(fmt)


def _specs(items: Any, where: str) -> tuple[ValueSpec, ...]:
    if not isinstance(items, list):
        raise ManifestError(f"{where} must be a list")
    out = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ManifestError(f"{where}: entry {item!r} needs a name")
        out.append(ValueSpec(item["name"], str(item.get("dtype", "")), tuple(item.get("shape", ()))))
    return tuple(out)


def _step(item: Any, where: str) -> Step:
    if not isinstance(item, Mapping):
        raise ManifestError(f"{where} must be an object")
    kind = item.get("kind")
    try:
        if kind == "segment":
            return Segment(
                str(item["file"]), tuple(item["inputs"]), tuple(item["outputs"]), int(item.get("nodes", 0))
            )
        if kind in ("all_reduce", "all_gather"):
            return Collective(
                str(kind),
                str(item["input"]),
                str(item["output"]),
                str(item.get("reduce_op", "sum")),
                int(item.get("group_size", 1)),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: malformed {kind} step ({exc}); recompile the artifact") from exc
    raise ManifestError(f"{where}: unknown step kind {kind!r}; upgrade tpcompile")


def onnx_rank(manifest: Manifest, rank: int) -> OnnxRank:
    """Rank ``rank``'s ONNX graph description; ManifestError when it is missing or malformed."""
    section = manifest.extra.get("onnx")
    ranks = section.get("ranks") if isinstance(section, Mapping) else None
    data = ranks.get(str(rank)) if isinstance(ranks, Mapping) else None
    where = f"{manifest.path}: extra.onnx.ranks[{rank}]"
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where} is missing; recompile with --format onnx")
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise ManifestError(f"{where}.steps must be a list")
    parsed = tuple(_step(s, f"{where}.steps[{i}]") for i, s in enumerate(steps))
    rank_dir = manifest.rank_entry(rank).dir
    for i, step in enumerate(parsed):
        if isinstance(step, Segment):
            artifact_path(manifest.path, step.file, f"extra.onnx.ranks[{rank}].steps[{i}].file", rank_dir)
    return OnnxRank(
        _specs(data.get("inputs"), f"{where}.inputs"),
        _specs(data.get("outputs"), f"{where}.outputs"),
        parsed,
    )
