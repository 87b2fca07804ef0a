"""The shared-memory transport's files and processes, as the launcher and the compiler see them: where the
segment files live, how they are named, cleaning up after a killed job, and whether a process still
exists. Nothing here imports torch: the ``tprun`` launcher, which starts the ranks, does not load it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SEGMENT_PREFIX", "SHM_DIR", "process_alive", "remove_segments", "segment_files"]

SHM_DIR = Path("/dev/shm")
#: Segment files are named ``SEGMENT_PREFIX + "<pid of rank 0>-<nonce>"``.
SEGMENT_PREFIX = "tpcompile-"


def segment_files(rank0_pid: int, directory: Path = SHM_DIR) -> list[Path]:
    """The segment files of the job whose rank 0 has (or had) pid ``rank0_pid``."""
    return sorted(directory.glob(f"{SEGMENT_PREFIX}{rank0_pid}-*"))


def remove_segments(rank0_pid: int, directory: Path = SHM_DIR) -> list[Path]:
    """Unlink the segment files a job whose rank 0 had pid ``rank0_pid`` left behind (if it was killed
    between creating the file and unlinking it); return the removed paths."""
    removed = []
    for path in segment_files(rank0_pid, directory):
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")
