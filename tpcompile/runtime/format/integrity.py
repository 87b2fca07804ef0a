"""Integrity of an artifact's files: the paths a manifest may name, content digests, and the names of
tpcompile's working directories.

Invariants: a path from a manifest is used only if it is a plain relative path (normalized, no ``..``)
that stays inside the artifact once symlinks are resolved (:func:`artifact_path`), so a manifest can
never make a reader open or hash anything else.  A file matches its manifest entry exactly when it is a
regular file and the sha256 of its bytes equals the recorded hex digest (compared case-insensitively); a
directory the runtime reads holds only listed files (:func:`check_listed`).  The manifest's own digest
covers its content as canonical JSON, so any changed value changes it and a change of layout does not.
A directory whose name matches :data:`WORK_DIR_PATTERN` is never an artifact.  Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ArtifactCorrupt, ManifestCorrupt

__all__ = [
    "MANIFEST_DIGEST_FIELD",
    "WORK_DIR_PATTERN",
    "artifact_path",
    "check_files",
    "check_listed",
    "outside_artifact",
    "plain_relative_path",
    "manifest_digest",
    "sha256_file",
    "work_dir_name",
]

#: Field of manifest.json holding :func:`manifest_digest` of the rest of it (a manifest from tpcompile always
#: has it; a reader that verifies requires it).
MANIFEST_DIGEST_FIELD = "manifest_sha256"
_CHUNK = 1 << 20  # 1 MiB
#: Names of tpcompile's working directories beside OUT (``.OUT.tmp-PID-XXXX`` while compiling,
#: ``.OUT.old-PID-XXXX`` for a replaced artifact being deleted); never loaded as an artifact.
WORK_DIR_PATTERN = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def work_dir_name(out_name: str, kind: str, pid: int) -> str:
    """Prefix of a working directory of the compile with process id ``pid`` writing ``out_name``."""
    return f".{out_name}.{kind}-{pid}-"


def plain_relative_path(rel: object) -> bool:
    """True for a normalized relative POSIX path without ``..``: ``tokenizer/vocab.json``, not ``./x``,
    ``a//b``, ``/etc/passwd``, ``../x`` or ``""``."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and ".." not in pure.parts and str(pure) == rel


def outside_artifact(rel: object, where: str) -> ManifestCorrupt:
    """The error for a manifest path ``rel`` (read at ``where``, e.g. ``ranks[0].files``) that is not a
    plain relative path inside the artifact."""
    return ManifestCorrupt(
        f"artifact corrupt: manifest.json: {where} names {rel!r}, which is not a plain relative path "
        "inside the artifact"
    )


def artifact_path(root: Path, rel: object, where: str, base: str = "") -> Path:
    """``root / base / rel`` for a path ``rel`` read from the manifest at ``where`` (relative to the
    artifact's directory ``base``, itself checked), checked without opening anything: plain, relative, and
    inside ``root`` after resolving symlinks.

    Raises:
        ManifestCorrupt: ``artifact corrupt: manifest.json: ...`` naming the path, for anything else.
    """
    if plain_relative_path(rel):
        path = root / base / str(rel)
        if path.resolve().is_relative_to(root.resolve()):
            return path
    raise outside_artifact(rel, where)


def manifest_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's content without :data:`MANIFEST_DIGEST_FIELD`, as canonical JSON.

    Any change to a value (a flipped byte that still parses) changes it; the file's layout does not.
    """
    body = {k: v for k, v in data.items() if k != MANIFEST_DIGEST_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of ``path``, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(root: Path, files: Mapping[str, str], prefix: str = "") -> None:
    """Check each ``root / name`` against its sha256 in ``files``, in the order given (names already
    checked by :func:`artifact_path`).

    Raises:
        ArtifactCorrupt: ``artifact incomplete: PREFIXNAME is missing``, ``artifact corrupt: PREFIXNAME is
            not a regular file`` (never opened: a FIFO or a device would block or never end) or
            ``artifact corrupt: PREFIXNAME`` for the first file that is missing or differs (``prefix`` is
            e.g. ``"rank1/"``).
    """
    for name, expected in files.items():
        path = root / name
        if not path.exists():
            raise ArtifactCorrupt(f"artifact incomplete: {prefix}{name} is missing")
        if not path.is_file():
            raise ArtifactCorrupt(f"artifact corrupt: {prefix}{name} is not a regular file")
        if sha256_file(path) != expected.lower():
            raise ArtifactCorrupt(f"artifact corrupt: {prefix}{name}")


def check_listed(root: Path, directory: str, listed: Collection[str]) -> None:
    """Every entry below ``root / directory`` (a directory the runtime reads from: a rank's, the
    tokenizer's) other than a subdirectory must be listed, as ``directory/...``, in ``listed``, so that
    nothing unhashed is read. Nothing is opened.

    Raises:
        ArtifactCorrupt: ``artifact corrupt: DIRECTORY/NAME is not listed in the manifest`` for the first
            unlisted entry in sorted order.
    """
    unlisted = []
    for parent, dirs, names in os.walk(root / directory):
        rel = Path(parent).relative_to(root).as_posix()
        unlisted += [f"{rel}/{n}" for n in names if f"{rel}/{n}" not in listed]
        unlisted += [f"{rel}/{d}" for d in dirs if (Path(parent) / d).is_symlink()]  # os.walk skips them
    if unlisted:
        raise ArtifactCorrupt(f"artifact corrupt: {min(unlisted)} is not listed in the manifest")
