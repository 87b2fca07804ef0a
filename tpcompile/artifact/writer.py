"""Write an artifact atomically: everything goes to a temporary directory beside OUT, which is renamed to OUT
only when complete, so an interrupted compile never leaves a directory that loads as an artifact.

Invariants: OUT is at every moment absent, the previous artifact, or the new complete one (with
``--force`` the two are swapped in one ``renameat2(RENAME_EXCHANGE)`` on Linux). A full disk is an
:class:`~tpcompile.errors.OutputError` naming OUT and the file being written, raised after the working
directory is gone (writers name their file in the ``OSError``: :func:`writing`). Working directories are
named ``.OUT.tmp-PID-XXXX`` / ``.OUT.old-PID-XXXX`` (see :data:`WORK_DIR_PATTERN`); the runtime refuses
to load them, and the next compile of OUT removes those whose process is gone (e.g. after a SIGKILL).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tpcompile.errors import OutputError, UsageError
from tpcompile.runtime.format import WORK_DIR_PATTERN, work_dir_name
from tpcompile.runtime.transport.segments import process_alive

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name ``path`` in an ``OSError`` raised while writing it (a failed ``write`` names no file)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _disk_full(exc: BaseException) -> OSError | None:
    """The ``OSError`` saying the disk (or the quota) is full behind ``exc``, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _output_error(full: OSError, out: Path, tmp: Path | None, existed: bool) -> OutputError:
    where = ""
    if full.filename is not None:
        name = Path(os.fsdecode(full.filename))
        where = f" ({name.relative_to(tmp) if tmp is not None and name.is_relative_to(tmp) else name})"
    left = f"{out} still holds the previous artifact" if existed else "nothing was left behind"
    return OutputError(f"no space left on device writing {out}{where}; {left}")


def remove_stale_work_dirs(out: Path) -> list[Path]:
    """Delete working directories of OUT left by compiles whose process no longer exists; return them."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        m = WORK_DIR_PATTERN.match(path.name)
        if m and m["out"] == out.name and path.is_dir() and not process_alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return int(fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)) == 0


def _default_dir_mode() -> int:
    umask = os.umask(0o22)
    os.umask(umask)
    return 0o777 & ~umask


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous artifact
        return
    old = Path(tempfile.mkdtemp(prefix=work_dir_name(out.name, "old", os.getpid()), dir=out.parent))
    old.rmdir()
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``out``, on failure it is removed."""
    out = out.resolve()
    if out.exists() and not force:
        raise UsageError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; refusing to replace it")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not a tpcompile artifact; refusing to replace it")
    existed = out.exists()
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_dirs(out)
        tmp = Path(tempfile.mkdtemp(prefix=work_dir_name(out.name, "tmp", os.getpid()), dir=out.parent))
        tmp.chmod(_default_dir_mode())  # mkdtemp makes it 0700; OUT gets the usual permissions
        yield tmp
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc)
        if full is not None:
            raise _output_error(full, out, tmp, existed) from exc
        raise
    _replace(tmp, out)
