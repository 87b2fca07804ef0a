"""Reading, validating and integrity-checking an artifact's ``manifest.json``.

Only the fields the runtime needs are modelled; unknown fields are kept in
:attr:`ArtifactManifest.raw` and otherwise ignored so that the compiler can
add fields without breaking deployed runtimes.  This module depends on the
standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ArtifactCorrupt, ManifestCorrupt, ManifestError
from .lm_info import CAUSAL_LM, LMInfo, parse_lm_info
from .placement import REPLICATED, Placement, parse_placement

__all__ = [
    "MANIFEST_DIGEST_FIELD",
    "MANIFEST_NAME",
    "SUPPORTED_FORMAT_VERSION",
    "WORK_DIR_PATTERN",
    "ArtifactManifest",
    "RankEntry",
    "TensorSpec",
    "load_artifact_manifest",
    "manifest_digest",
    "sha256_file",
    "verify_artifact",
    "verify_rank_files",
    "verify_shared_files",
    "work_dir_name",
]

MANIFEST_NAME = "manifest.json"
#: Field of manifest.json holding :func:`manifest_digest` of the rest of it (optional: absent in
#: hand-written manifests; a manifest from tpcompile always has it).
MANIFEST_DIGEST_FIELD = "manifest_sha256"
SUPPORTED_FORMAT_VERSION = 1
PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"
_CHUNK = 1 << 20  # 1 MiB
#: Names of tpcompile's working directories beside OUT (``.OUT.tmp-PID-XXXX`` while compiling,
#: ``.OUT.old-PID-XXXX`` for a replaced artifact being deleted); never loaded as an artifact.
WORK_DIR_PATTERN = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def work_dir_name(out_name: str, kind: str, pid: int) -> str:
    """Prefix of a working directory of the compile with process id ``pid`` writing ``out_name``."""
    return f".{out_name}.{kind}-{pid}-"


Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a program input or output.

    ``shape`` entries are ints for static dimensions and strings (symbol names
    such as ``"s0"``) for dynamic ones; for a sharded output (``placement``
    ``S(...)``) the shape is the global one and each rank returns its slice.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    placement: Placement = REPLICATED


@dataclass(frozen=True)
class RankEntry:
    """One rank's directory and the sha256 of every file in it."""

    rank: int
    dir: str
    files: Mapping[str, str]
    weight_bytes: int = 0

    def relpath(self, filename: str) -> str:
        """Return ``"<dir>/<filename>"`` as shown in user-facing messages."""
        return f"{self.dir}/{filename}"


@dataclass(frozen=True)
class ArtifactManifest:
    """The subset of ``manifest.json`` the runtime relies on."""

    path: Path
    format_version: int
    tp: int
    group_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ranks: tuple[RankEntry, ...]
    kind: str = "generic"
    dtype: str | None = None
    torch_version: str | None = None
    tool_version: str | None = None
    zero_state: tuple[str, ...] = ()
    shared_files: Mapping[str, str] = field(default_factory=dict)
    lm: LMInfo | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_causal_lm(self) -> bool:
        """True for artifacts compiled as a causal LM (``kind == "causal_lm"``)."""
        return self.kind == CAUSAL_LM

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


def _parse_tensor_specs(items: list[Any], where: str, tp: int | None = None) -> tuple[TensorSpec, ...]:
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
        placement = parse_placement(item.get("placement"), tp, loc) if tp is not None else REPLICATED
        if placement.dim is not None and not -len(shape) <= placement.dim < len(shape):
            raise ManifestError(f"{loc}: placement {placement} names a dim the {len(shape)}-dim tensor lacks")
        specs.append(TensorSpec(name=name, dtype=dtype, shape=tuple(shape), placement=placement))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where} has duplicate names: {names}")
    return tuple(specs)


def _relative_path(rel: object, where: str) -> str:
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if pure is None or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ManifestError(f"{where}: {rel!r} must be a relative path inside the artifact")
    return str(rel)


def _parse_shared_files(data: Mapping[str, Any], where: str) -> dict[str, str]:
    files = data.get("shared_files", {})
    if not isinstance(files, Mapping):
        raise ManifestError(f"{where}: field 'shared_files' must be an object")
    for rel, digest in files.items():
        _relative_path(rel, f"{where}: shared_files")
        if not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{where}: shared file {rel!r} has invalid sha256 {digest!r}")
    return dict(files)


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
    pure = PurePosixPath(rdir)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ManifestError(f"{loc}: rank directory {rdir!r} must be a relative path inside the artifact")
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{loc}: file {name!r} has invalid sha256 {digest!r}")
    weight_bytes = item.get("weight_bytes", 0)
    if not isinstance(weight_bytes, int):
        raise ManifestError(f"{loc}: field 'weight_bytes' has unexpected value {weight_bytes!r}")
    if not (artifact_dir / rdir).is_dir():
        raise ManifestError(f"rank directory {artifact_dir / rdir} is missing")
    return RankEntry(rank=rank, dir=rdir, files=dict(files), weight_bytes=weight_bytes)


def manifest_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's content without :data:`MANIFEST_DIGEST_FIELD`, as canonical JSON.

    Any change to a value (a flipped byte that still parses) changes it; the file's layout does not.
    """
    body = {k: v for k, v in data.items() if k != MANIFEST_DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _check_digest(data: Mapping[str, Any]) -> None:
    if MANIFEST_DIGEST_FIELD in data and data[MANIFEST_DIGEST_FIELD] != manifest_digest(data):
        raise ManifestCorrupt(f"artifact corrupt: {MANIFEST_NAME}")


def load_artifact_manifest(artifact_dir: str | Path, verify: bool = True) -> ArtifactManifest:
    """Load and validate ``<artifact_dir>/manifest.json``.

    With ``verify`` (the default) the manifest's own digest (:data:`MANIFEST_DIGEST_FIELD`), when
    present, must match its content.

    Raises:
        ManifestCorrupt: the file is not valid UTF-8 or JSON, or its digest differs
            (``artifact corrupt: manifest.json``).
        ManifestError: the file is missing, lacks required
            fields, was written by a newer format version, or references a
            rank directory that does not exist, or ``artifact_dir`` is one of
            tpcompile's working directories (see :data:`WORK_DIR_PATTERN`).
    """
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if WORK_DIR_PATTERN.match(root.resolve().name):
        raise ManifestError(
            f"{root} is a working directory of an interrupted or running tpcompile, not an artifact; "
            "use the compile's output directory"
        )
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {root}: not a tpcompile artifact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ManifestCorrupt(f"artifact corrupt: {MANIFEST_NAME} is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise ManifestCorrupt(
            f"artifact corrupt: {MANIFEST_NAME} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from exc
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path} must contain a JSON object")

    where = str(path)
    version = _field(data, "format_version", int, where)
    if version > SUPPORTED_FORMAT_VERSION:
        raise ManifestError(
            f"manifest format version {version} is newer than this runtime supports "
            f"({SUPPORTED_FORMAT_VERSION}); upgrade tpcompile"
        )
    if verify:
        _check_digest(data)
    if version < 1:
        raise ManifestError(f"{where}: invalid format_version {version}")
    tp = _field(data, "tp", int, where)
    if tp < 1:
        raise ManifestError(f"{where}: tp must be >= 1, got {tp}")
    group_name = _field(data, "group_name", str, where)
    inputs = _parse_tensor_specs(_field(data, "inputs", list, where), "manifest inputs")
    outputs = _parse_tensor_specs(_field(data, "outputs", list, where), "manifest outputs", tp)
    ranks_raw = _field(data, "ranks", list, where)
    ranks = tuple(_parse_rank(item, root, i) for i, item in enumerate(ranks_raw))
    got = sorted(r.rank for r in ranks)
    if got != list(range(tp)):
        raise ManifestError(f"{where}: ranks {got} do not match tp={tp}; regenerate the artifact")

    tool = data.get("tool")
    tool_version = tool.get("version") if isinstance(tool, Mapping) else None
    torch_version = data.get("torch_version")
    dtype = data.get("dtype")
    kind = data.get("kind", "generic")
    kind = kind if isinstance(kind, str) else "generic"
    lm = parse_lm_info(data.get("extra"), where) if kind == CAUSAL_LM else None
    return ArtifactManifest(
        path=root,
        format_version=version,
        tp=tp,
        group_name=group_name,
        inputs=inputs,
        outputs=outputs,
        ranks=tuple(sorted(ranks, key=lambda r: r.rank)),
        kind=kind,
        dtype=dtype if isinstance(dtype, str) else None,
        torch_version=torch_version if isinstance(torch_version, str) else None,
        tool_version=tool_version if isinstance(tool_version, str) else None,
        zero_state=_parse_zero_state(data, where),
        shared_files=_parse_shared_files(data, where),
        lm=lm,
        raw=data,
    )


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of ``path``, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_rank_files(artifact_dir: str | Path, entry: RankEntry) -> None:
    """Check every file listed for ``entry`` against its recorded sha256.

    Raises:
        ArtifactCorrupt: a listed file is missing or its content differs,
            e.g. ``artifact corrupt: rank1/weights.safetensors``.
    """
    rank_dir = Path(artifact_dir) / entry.dir
    for name, expected in entry.files.items():
        path = rank_dir / name
        rel = entry.relpath(name)
        if not path.is_file():
            raise ArtifactCorrupt(f"artifact incomplete: {rel} is missing")
        if sha256_file(path) != expected.lower():
            raise ArtifactCorrupt(f"artifact corrupt: {rel}")


def verify_shared_files(manifest: ArtifactManifest) -> None:
    """Check every artifact-level file (``shared_files``, e.g. the tokenizer) against its sha256.

    Raises:
        ArtifactCorrupt: a listed file is missing or differs,
            e.g. ``artifact corrupt: tokenizer/tokenizer.json``.
    """
    for rel, expected in sorted(manifest.shared_files.items()):
        path = manifest.path / rel
        if not path.is_file():
            raise ArtifactCorrupt(f"artifact incomplete: {rel} is missing")
        if sha256_file(path) != expected.lower():
            raise ArtifactCorrupt(f"artifact corrupt: {rel}")


def verify_artifact(manifest: ArtifactManifest) -> None:
    """Check every file the manifest lists: the shared files, then each rank's files in rank order.

    Raises:
        ArtifactCorrupt: the first file that is missing or differs from its recorded sha256.
    """
    verify_shared_files(manifest)
    for entry in manifest.ranks:
        verify_rank_files(manifest.path, entry)
