"""The artifact manifest: what ``OUT/manifest.json`` holds. Plain dataclasses, serialised with sorted keys
so that two compiles of the same input give identical bytes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpcompile.runtime.manifest import MANIFEST_DIGEST_FIELD, manifest_digest

FORMAT_VERSION = 1


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]
    placement: str = "R"  # outputs: R, or S(dim;sizes) when each rank returns its slice


@dataclass
class ParameterEntry:
    name: str
    shape: list[int]
    dtype: str
    placement: str  # R, P or S(dim;sizes)
    plan: str  # colwise | rowwise | replicate | vocab | partial


@dataclass
class CollectiveEntry:
    op: str  # all_reduce | all_gather
    producer: str  # the node whose value is redistributed
    consumers: list[str]  # the nodes that need it
    src: str
    dst: str
    bytes_per_call: int
    scope: str  # the module path the producer comes from ("" at top level)


@dataclass
class RankEntry:
    rank: int
    dir: str
    weight_bytes: int
    files: dict[str, str]  # file name -> sha256


@dataclass
class Manifest:
    tp: int
    kind: str
    dtype: str
    group_name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: list[ParameterEntry]
    collectives: list[CollectiveEntry]
    ranks: list[RankEntry]
    total_weight_bytes: int
    tool: dict[str, str]
    torch_version: str
    source: str
    warnings: list[str] = field(default_factory=list)
    zero_state: list[str] = field(default_factory=list)  # buffers created as zeros at load (KV caches)
    shared_files: dict[str, str] = field(default_factory=dict)  # artifact-root files -> sha256
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    format: str = "torch"  # torch: rank{r}/program.pt2; onnx: rank{r}/segment{i}.onnx (see extra.onnx)

    def to_json(self) -> str:
        """The manifest with its own content digest (checked by the runtime before anything is used)."""
        data = asdict(self)
        data[MANIFEST_DIGEST_FIELD] = manifest_digest(data)
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @staticmethod
    def read(path: Path) -> Manifest:
        data = json.loads(path.read_text())
        data.pop(MANIFEST_DIGEST_FIELD, None)
        return Manifest(
            **{
                **data,
                "inputs": [TensorSpec(**x) for x in data["inputs"]],
                "outputs": [TensorSpec(**x) for x in data["outputs"]],
                "parameters": [ParameterEntry(**x) for x in data["parameters"]],
                "collectives": [CollectiveEntry(**x) for x in data["collectives"]],
                "ranks": [RankEntry(**x) for x in data["ranks"]],
            }
        )
