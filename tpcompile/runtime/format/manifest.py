"""The artifact's manifest (``OUT/manifest.json``): one schema, written by the compiler, read by the runtime.

The compiler fills a :class:`Manifest` and writes it with :meth:`Manifest.to_json` (sorted keys, so two
compiles of the same input give identical bytes, plus the content digest of
:mod:`~tpcompile.runtime.format.integrity`).  The runtime reads it back with
:func:`load_artifact_manifest`, which checks every field it relies on and raises a one-line
:class:`ManifestError` (or :class:`ManifestCorrupt`) naming the field otherwise.  Unknown fields are
ignored, so the compiler can add fields without breaking deployed runtimes.

Invariants: reading what :meth:`Manifest.to_json` wrote gives back an equal :class:`Manifest`; a loaded
manifest has ranks ``0..tp-1`` in order, each with an existing directory inside the artifact, and output
placements that are ``R`` or an ``S(...)`` with one size per rank.  Every path it holds (rank directories,
rank files, shared files, the tokenizer directory) was checked by
:func:`~tpcompile.runtime.format.integrity.artifact_path` before anything but manifest.json was opened, and
when loaded with ``verify`` it carries its own digest, which matches.  Verifying its files
(:func:`verify_artifact`) checks every listed file and that the directories the runtime reads hold nothing
unlisted, so only ``--skip-verify`` (``verify=False``), never the artifact, turns checking off.  Standard
library only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import ManifestCorrupt, ManifestError, first_line
from .integrity import (
    MANIFEST_DIGEST_FIELD,
    WORK_DIR_PATTERN,
    artifact_path,
    check_files,
    check_listed,
    manifest_digest,
)
from .lm import CAUSAL_LM, LMInfo, parse_lm_info
from .placement import REPLICATE, Partial, Pieces, Placement, Replicate, RootPlacement, Shard, parse_placement

__all__ = [
    "FORMAT_ONNX",
    "FORMAT_TORCH",
    "FORMAT_VERSION",
    "GENERIC",
    "MANIFEST_NAME",
    "PROGRAM_FILE",
    "WEIGHTS_FILE",
    "CollectiveEntry",
    "Dim",
    "Manifest",
    "ParameterEntry",
    "RankEntry",
    "SymbolRange",
    "TensorSpec",
    "load_artifact_manifest",
    "verify_artifact",
    "verify_rank_files",
    "verify_shared_files",
]

MANIFEST_NAME = "manifest.json"
#: The newest ``format_version`` this code writes and reads.
FORMAT_VERSION = 1
#: ``format``: how the ranks' programs are stored (torch: ``rank{r}/program.pt2``; onnx: segments, see
#: :mod:`~tpcompile.runtime.format.onnx_section`).
FORMAT_TORCH = "torch"
FORMAT_ONNX = "onnx"
#: ``kind`` of an artifact that is not a causal LM.
GENERIC = "generic"
PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"

Dim = int | str
#: Fields of a dataclass that :meth:`Manifest.to_json` leaves out (where the manifest was read from).
_NOT_WRITTEN = "not_written"


@dataclass(init=False)
class TensorSpec:
    """Name, dtype and shape of a program input or output.

    ``shape`` entries are ints for static dimensions and strings (symbol names such as ``"s0"``) for
    dynamic ones; for a sharded output (placement ``S(...)``) the shape is the global one and each rank
    returns its slice.  The placement may be given in its text form; it is kept as a value.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    placement: Placement

    def __init__(
        self, name: str, dtype: str, shape: Sequence[Dim], placement: Placement | str = REPLICATE
    ) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = tuple(shape)
        self.placement = _placement(placement)


@dataclass(frozen=True)
class SymbolRange:
    """The sizes a symbolic dimension (a name such as ``"s0"`` in an input's shape) takes: ``min`` to
    ``max`` inclusive (``max`` None: no upper bound), as the program was exported for them."""

    min: int
    max: int | None = None

    def __contains__(self, size: object) -> bool:
        return isinstance(size, int) and self.min <= size and (self.max is None or size <= self.max)

    def __str__(self) -> str:
        return f"{self.min} to {self.max}" if self.max is not None else f"{self.min} or more"


@dataclass(init=False)
class ParameterEntry:
    """A parameter (or buffer) of the source model and how it was split (``plan``: colwise, rowwise, ...)."""

    name: str
    shape: list[int]
    dtype: str
    placement: RootPlacement
    plan: str

    def __init__(
        self, name: str, shape: Sequence[int], dtype: str, placement: RootPlacement | str, plan: str
    ) -> None:
        self.name = name
        self.shape = list(shape)
        self.dtype = dtype
        self.placement = parse_placement(placement) if isinstance(placement, str) else placement
        self.plan = plan


@dataclass
class CollectiveEntry:
    """One collective in every rank's program: which value it redistributes, from and to what placement."""

    op: str  # all_reduce | all_gather
    producer: str  # the node whose value is redistributed
    consumers: list[str]  # the nodes that need it
    src: str
    dst: str
    bytes_per_call: int  # of the value, at the example input sizes
    scope: str  # the module path the producer comes from ("" at top level)
    #: the dtype the value crosses in when the program casts it first (``--comm-dtype``); None: its own
    comm_dtype: str | None = None
    wire_bytes_per_call: int | None = None  # what crosses per call (None: bytes_per_call)

    @property
    def wire_bytes(self) -> int:
        """Bytes that cross between ranks per call."""
        return self.bytes_per_call if self.wire_bytes_per_call is None else self.wire_bytes_per_call


@dataclass
class RankEntry:
    """One rank's directory and the sha256 of every file in it."""

    rank: int
    dir: str
    weight_bytes: int
    files: dict[str, str]

    def relpath(self, filename: str) -> str:
        """Return ``"<dir>/<filename>"`` as shown in user-facing messages."""
        return f"{self.dir}/{filename}"


@dataclass
class Manifest:
    """Everything ``manifest.json`` holds; ``path`` (the artifact directory) is where it was read from."""

    tp: int
    group_name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ranks: list[RankEntry]
    kind: str = GENERIC
    dtype: str | None = None
    parameters: list[ParameterEntry] = field(default_factory=list)
    collectives: list[CollectiveEntry] = field(default_factory=list)
    total_weight_bytes: int = 0
    tool: dict[str, str] = field(default_factory=dict)
    torch_version: str | None = None
    source: str = ""
    warnings: list[str] = field(default_factory=list)
    zero_state: Sequence[str] = ()  # buffers created as zeros at load (KV caches)
    symbols: dict[str, SymbolRange] = field(default_factory=dict)  # each symbolic input dim's sizes
    shared_files: dict[str, str] = field(default_factory=dict)  # artifact-root files -> sha256
    extra: dict[str, Any] = field(default_factory=dict)  # the LM section (lm), the ONNX section (onnx), ...
    #: the dtype all-reduce payloads cross in (``tpcompile --comm-dtype``; absent in older manifests, which
    #: sent every payload in its own dtype: read as ``dtype``)
    comm_dtype: str | None = None
    format_version: int = FORMAT_VERSION
    format: str = FORMAT_TORCH
    path: Path = field(default=Path(), compare=False, repr=False, metadata={_NOT_WRITTEN: True})

    def __post_init__(self) -> None:
        self.zero_state = tuple(self.zero_state)
        if self.comm_dtype is None:  # written before --comm-dtype existed: payloads in their own dtype
            self.comm_dtype = self.dtype

    def to_json(self) -> str:
        """The manifest with its own content digest (checked by the runtime before anything is used)."""
        data = _json_value(self)
        data[MANIFEST_DIGEST_FIELD] = manifest_digest(data)
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest file ``path`` (``<artifact>/manifest.json``), checked as
        :func:`load_artifact_manifest` checks it but without its digest.

        Raises:
            ValueError: the file is missing or invalid (the one-line message of the runtime's error).
        """
        try:
            if path.name != MANIFEST_NAME:
                raise ManifestError(f"{path} is not a {MANIFEST_NAME}")
            return load_artifact_manifest(path.parent, verify=False)
        except ManifestError as exc:
            raise ValueError(first_line(exc)) from exc

    @property
    def is_causal_lm(self) -> bool:
        """True for artifacts compiled as a causal LM (``kind == "causal_lm"``)."""
        return self.kind == CAUSAL_LM

    @property
    def lm(self) -> LMInfo | None:
        """The LM section (``extra.lm``) of a causal LM, else None.

        Raises:
            ManifestError: a causal LM whose section is missing or malformed.
        """
        return parse_lm_info(self.extra, str(self.path / MANIFEST_NAME)) if self.is_causal_lm else None

    @property
    def casts_all_reduces(self) -> bool:
        """True when the programs cast all-reduce payloads to a narrower ``comm_dtype`` first."""
        return any(c.comm_dtype is not None for c in self.collectives)

    @property
    def tool_version(self) -> str | None:
        """Version of the tpcompile that wrote the artifact, if recorded."""
        version = self.tool.get("version")
        return version if isinstance(version, str) else None

    @property
    def input_names(self) -> list[str]:
        """Input names in positional order."""
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in the order the program returns them (flattened)."""
        return [s.name for s in self.outputs]

    def rank_entry(self, rank: int) -> RankEntry:
        """Return the entry for ``rank`` or raise :class:`ManifestError`."""
        for entry in self.ranks:
            if entry.rank == rank:
                return entry
        raise ManifestError(f"manifest in {self.path} has no entry for rank {rank} (tp={self.tp})")

    def rank_dir(self, rank: int) -> Path:
        """Absolute directory holding ``rank``'s program and weights."""
        return self.path / self.rank_entry(rank).dir


def _placement(value: Placement | str) -> Placement:
    parsed = parse_placement(value) if isinstance(value, str) else value
    if isinstance(parsed, Pieces):
        raise ValueError(f"a program input or output cannot have the placement {parsed} of stored pieces")
    return parsed


def _json_value(value: Any) -> Any:
    """``value`` as JSON data: placements as their text, dataclasses as objects (their written fields)."""
    if isinstance(value, (Replicate, Partial, Shard, Pieces)):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _json_value(getattr(value, f.name))
            for f in fields(value)
            if not f.metadata.get(_NOT_WRITTEN)
        }
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- reading and validation


def _field(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{where} is missing field '{key}'; regenerate the artifact with tpcompile")
    value = obj[key]
    # bool is a subclass of int; never accept it where a number is expected.
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in _as_tuple(typ)):
        raise ManifestError(f"{where}: field '{key}' has unexpected value {value!r}")
    return value


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _output_placement(text: object, tp: int, where: str) -> Placement:
    """An output's placement: ``R`` or ``S(dim;sizes)`` with one size per rank."""
    if text is None:
        return REPLICATE
    try:
        placement = parse_placement(text) if isinstance(text, str) else None
    except ValueError:
        placement = None
    if not isinstance(placement, (Replicate, Shard)) or (
        isinstance(placement, Shard) and placement.overlapping
    ):
        raise ManifestError(f"{where}: placement {text!r} must be 'R' or 'S(dim;size_0,...,size_{{tp-1}})'")
    if isinstance(placement, Shard) and len(placement.sizes) != tp:
        raise ManifestError(
            f"{where}: placement {text!r} lists {len(placement.sizes)} sizes but the artifact has tp={tp}"
        )
    return placement


def _parse_tensor_specs(items: list[Any], where: str, tp: int | None = None) -> list[TensorSpec]:
    """Tensor specs; placements are read for outputs only (``tp`` given), inputs are replicated."""
    specs: list[TensorSpec] = []
    for i, item in enumerate(items):
        loc = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise ManifestError(f"{loc} must be an object, got {item!r}")
        name = _field(item, "name", str, loc)
        dtype = _field(item, "dtype", str, loc)
        shape = _field(item, "shape", list, loc)
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                raise ManifestError(f"{loc}: shape entry {d!r} must be an int or a symbol name")
        placement = _output_placement(item.get("placement"), tp, loc) if tp is not None else REPLICATE
        if isinstance(placement, Shard) and not -len(shape) <= placement.dim < len(shape):
            raise ManifestError(f"{loc}: placement {placement} names a dim the {len(shape)}-dim tensor lacks")
        specs.append(TensorSpec(name, dtype, shape, placement))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where} has duplicate names: {names}")
    return specs


def _parse_shared_files(data: Mapping[str, Any], root: Path, where: str) -> dict[str, str]:
    files = data.get("shared_files", {})
    if not isinstance(files, Mapping):
        raise ManifestError(f"{where}: field 'shared_files' must be an object")
    for rel, digest in files.items():
        artifact_path(root, rel, "shared_files")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{where}: shared file {rel!r} has invalid sha256 {digest!r}")
    return dict(files)


def _parse_symbols(data: Mapping[str, Any], where: str) -> dict[str, SymbolRange]:
    """``symbols``: each symbolic dimension's range (absent in manifests older than it: no range known)."""
    raw = data.get("symbols", {})
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: field 'symbols' must be an object")
    symbols = {}
    for name, item in raw.items():
        low = item.get("min") if isinstance(item, Mapping) else None
        high = item.get("max") if isinstance(item, Mapping) else None
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high) if v is not None)
        if low is None or not ints or low < 0 or (high is not None and high < low):
            raise ManifestError(f"{where}: symbols[{name!r}] must be {{'min': int, 'max': int or null}}")
        symbols[str(name)] = SymbolRange(low, high)
    return symbols


def _parse_zero_state(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    names = data.get("zero_state", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"{where}: field 'zero_state' must be a list of buffer names")
    return tuple(names)


def _parse_rank(item: Any, artifact_dir: Path, index: int) -> RankEntry:
    loc = f"manifest ranks[{index}]"
    if not isinstance(item, Mapping):
        raise ManifestError(f"{loc} must be an object, got {item!r}")
    rank = _field(item, "rank", int, loc)
    rdir = _field(item, "dir", str, loc)
    files = _field(item, "files", Mapping, loc)
    rank_dir = artifact_path(artifact_dir, rdir, f"ranks[{index}].dir")
    for name, digest in files.items():
        artifact_path(artifact_dir, name, f"ranks[{index}].files", base=rdir)
        if not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{loc}: file {name!r} has invalid sha256 {digest!r}")
    weight_bytes = item.get("weight_bytes", 0)
    if not isinstance(weight_bytes, int):
        raise ManifestError(f"{loc}: field 'weight_bytes' has unexpected value {weight_bytes!r}")
    if not rank_dir.is_dir():
        raise ManifestError(f"rank directory {rank_dir} is missing")
    return RankEntry(rank=rank, dir=rdir, weight_bytes=weight_bytes, files=dict(files))


def _parse_entries(
    data: Mapping[str, Any], key: str, build: type[ParameterEntry] | type[CollectiveEntry], where: str
) -> list[Any]:
    """The compiler's records (``parameters``, ``collectives``): the runtime does not use them, but keeps
    them so that a manifest it read can be written again."""
    items = data.get(key, [])
    if not isinstance(items, list):
        raise ManifestError(f"{where}: field '{key}' must be a list")
    names = {f.name for f in fields(build)}
    entries = []
    for i, item in enumerate(items):
        try:
            entries.append(build(**{k: v for k, v in item.items() if k in names}))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{where}: {key}[{i}] is malformed ({first_line(exc)}); recompile it"
            ) from exc
    return entries


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _read_json(root: Path) -> Any:
    path = root / MANIFEST_NAME
    if WORK_DIR_PATTERN.match(root.resolve().name):
        raise ManifestError(
            f"{root} is a working directory of an interrupted or running tpcompile, not an artifact; "
            "use the compile's output directory"
        )
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {root}: not a tpcompile artifact")
    artifact_path(root, MANIFEST_NAME, "the artifact")  # not a link to a file elsewhere
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestCorrupt(f"artifact corrupt: {MANIFEST_NAME} is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise ManifestCorrupt(
            f"artifact corrupt: {MANIFEST_NAME} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from exc


def load_artifact_manifest(artifact_dir: str | Path, verify: bool = True) -> Manifest:
    """Load and validate ``<artifact_dir>/manifest.json``.

    With ``verify`` (the default) the manifest's own digest (:data:`MANIFEST_DIGEST_FIELD`) must be
    present and match its content.  Every path in it is checked either way (see the module invariant).

    Raises:
        ManifestCorrupt: the file is not valid UTF-8 or JSON, its digest is missing or differs
            (``artifact corrupt: manifest.json``), or it names a path that is not a plain relative path
            inside the artifact.
        ManifestError: the file is missing, lacks required
            fields, was written by a newer format version, or references a
            rank directory that does not exist, or ``artifact_dir`` is one of
            tpcompile's working directories (see :data:`WORK_DIR_PATTERN`).
    """
    root = Path(artifact_dir)
    data = _read_json(root)
    where = str(root / MANIFEST_NAME)
    if not isinstance(data, Mapping):
        raise ManifestError(f"{where} must contain a JSON object")
    version = _field(data, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"manifest format version {version} is newer than this runtime supports "
            f"({FORMAT_VERSION}); upgrade tpcompile"
        )
    if verify and MANIFEST_DIGEST_FIELD not in data:
        raise ManifestCorrupt(
            f"artifact corrupt: {MANIFEST_NAME} has no {MANIFEST_DIGEST_FIELD}; recompile it (or run it "
            "unchecked with --skip-verify)"
        )
    if verify and data[MANIFEST_DIGEST_FIELD] != manifest_digest(data):
        raise ManifestCorrupt(f"artifact corrupt: {MANIFEST_NAME}")
    if version < 1:
        raise ManifestError(f"{where}: invalid format_version {version}")
    tp = _field(data, "tp", int, where)
    if tp < 1:
        raise ManifestError(f"{where}: tp must be >= 1, got {tp}")
    group_name = _field(data, "group_name", str, where)
    inputs = _parse_tensor_specs(_field(data, "inputs", list, where), "manifest inputs")
    outputs = _parse_tensor_specs(_field(data, "outputs", list, where), "manifest outputs", tp)
    ranks_raw = _field(data, "ranks", list, where)
    ranks = [_parse_rank(item, root, i) for i, item in enumerate(ranks_raw)]
    got = sorted(r.rank for r in ranks)
    if got != list(range(tp)):
        raise ManifestError(f"{where}: ranks {got} do not match tp={tp}; regenerate the artifact")
    fmt = data.get("format", FORMAT_TORCH)
    if not isinstance(fmt, str):
        raise ManifestError(f"{root}: unknown artifact format {fmt!r}; upgrade tpcompile")
    tool, extra, warnings = data.get("tool"), data.get("extra"), data.get("warnings")
    total = data.get("total_weight_bytes")
    kind = data.get("kind", GENERIC)
    manifest = Manifest(
        tp=tp,
        group_name=group_name,
        inputs=inputs,
        outputs=outputs,
        ranks=sorted(ranks, key=lambda r: r.rank),
        kind=kind if isinstance(kind, str) else GENERIC,
        dtype=_optional_str(data.get("dtype")),
        comm_dtype=_optional_str(data.get("comm_dtype")),
        parameters=_parse_entries(data, "parameters", ParameterEntry, where),
        collectives=_parse_entries(data, "collectives", CollectiveEntry, where),
        total_weight_bytes=total if isinstance(total, int) and not isinstance(total, bool) else 0,
        tool=dict(tool) if isinstance(tool, Mapping) else {},
        torch_version=_optional_str(data.get("torch_version")),
        source=_optional_str(data.get("source")) or "",
        warnings=[w for w in warnings if isinstance(w, str)] if isinstance(warnings, list) else [],
        zero_state=_parse_zero_state(data, where),
        symbols=_parse_symbols(data, where),
        shared_files=_parse_shared_files(data, root, where),
        extra=dict(extra) if isinstance(extra, Mapping) else {},
        format_version=version,
        format=fmt,
        path=root,
    )
    lm = manifest.lm  # a causal LM's section is checked now, not when the first prompt arrives
    if lm is not None and lm.tokenizer is not None:
        artifact_path(root, lm.tokenizer, "extra.lm.tokenizer")
    return manifest


# --------------------------------------------------------------------------- the files it lists


def verify_rank_files(artifact_dir: str | Path, entry: RankEntry) -> None:
    """Check that ``entry``'s directory holds only the files listed for it, and each against its sha256.

    Raises:
        ArtifactCorrupt: a file is not listed (``artifact corrupt: rank1/x is not listed in the
            manifest``), a listed file is missing or its content differs, e.g.
            ``artifact corrupt: rank1/weights.safetensors``.
    """
    root = Path(artifact_dir)
    check_listed(root, entry.dir, {f"{entry.dir}/{name}" for name in entry.files})
    check_files(root / entry.dir, entry.files, f"{entry.dir}/")


def verify_shared_files(manifest: Manifest) -> None:
    """Check that the tokenizer directory holds only listed files, and every artifact-level file
    (``shared_files``) against its sha256.

    Raises:
        ArtifactCorrupt: a file is not listed, or a listed file is missing or differs,
            e.g. ``artifact corrupt: tokenizer/tokenizer.json``.
    """
    lm = manifest.lm
    if lm is not None and lm.tokenizer is not None:
        check_listed(manifest.path, lm.tokenizer, manifest.shared_files)
    check_files(manifest.path, dict(sorted(manifest.shared_files.items())))


def verify_artifact(manifest: Manifest) -> None:
    """Check every file the manifest lists: the shared files, then each rank's files in rank order.

    Raises:
        ArtifactCorrupt: the first file that is missing or differs from its recorded sha256.
    """
    verify_shared_files(manifest)
    for entry in manifest.ranks:
        verify_rank_files(manifest.path, entry)
