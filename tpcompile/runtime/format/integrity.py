"""Integrity of an artifact's files: content digests, and the names of tpcompile's working directories.

Invariants: a file matches its manifest entry exactly when the sha256 of its bytes equals the recorded
hex digest (compared case-insensitively); the manifest's own digest covers its content as canonical JSON,
so any changed value changes it and a change of layout does not.  A directory whose name matches
:data:`WORK_DIR_PATTERN` is never an artifact.  Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ArtifactCorrupt

__all__ = [
    "MANIFEST_DIGEST_FIELD",
    "WORK_DIR_PATTERN",
    "check_files",
    "manifest_digest",
    "sha256_file",
    "work_dir_name",
]

#: Field of manifest.json holding :func:`manifest_digest` of the rest of it (optional: absent in
#: hand-written manifests; a manifest from tpcompile always has it).
MANIFEST_DIGEST_FIELD = "manifest_sha256"
_CHUNK = 1 << 20  # 1 MiB
#: Names of tpcompile's working directories beside OUT (``.OUT.tmp-PID-XXXX`` while compiling,
#: ``.OUT.old-PID-XXXX`` for a replaced artifact being deleted); never loaded as an artifact.
WORK_DIR_PATTERN = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def work_dir_name(out_name: str, kind: str, pid: int) -> str:
    """Prefix of a working directory of the compile with process id ``pid`` writing ``out_name``."""
    return f".{out_name}.{kind}-{pid}-"


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
    """Check each ``root / name`` against its sha256 in ``files``, in the order given.

    Raises:
        ArtifactCorrupt: ``artifact incomplete: PREFIXNAME is missing`` or ``artifact corrupt: PREFIXNAME``
            for the first file that is missing or differs (``prefix`` is e.g. ``"rank1/"``).
    """
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            raise ArtifactCorrupt(f"artifact incomplete: {prefix}{name} is missing")
        if sha256_file(path) != expected.lower():
            raise ArtifactCorrupt(f"artifact corrupt: {prefix}{name}")
