"""Write an artifact atomically: everything goes to a temporary directory beside OUT, which is renamed to OUT
only when complete, so an interrupted compile never leaves a directory that loads as an artifact."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tpcompile.errors import UsageError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``out``, on failure it is removed."""
    out = out.resolve()
    if out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a tpcompile artifact; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
