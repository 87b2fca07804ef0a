"""Process-group setup shared by every runtime entry point.

Rendezvous is ``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (plus optional ``LOCAL_WORLD_SIZE``) are
set by :mod:`tpcompile.runtime.launch.launcher` or by ``torchrun``.

Invariants: ranks wait for each other at start-up at least :data:`RENDEZVOUS_TIMEOUT_S`,
then every collective on the group fails after ``--timeout`` (NCCL: :data:`~.watchdog.NCCL_TIMEOUT_GRACE_S`
later, so that the rank's :class:`~.watchdog.ProgressWatchdog` reports the timeout in one line first).  A
CUDA rank selects ``cuda:LOCAL_RANK`` and the NCCL error handling (:data:`NCCL_ENV`) before the process
group exists; a backend's failure reaches the user as one :class:`CollectiveError` line
(:func:`backend_failure`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from ..cpu_bind import rank_threads
from ..errors import BackendError, CollectiveError, first_line
from .watchdog import NCCL_TIMEOUT_GRACE_S

__all__ = [
    "BACKENDS",
    "CollectiveError",
    "DistEnv",
    "NCCL_ENV",
    "RENDEZVOUS_TIMEOUT_S",
    "backend_failure",
    "choose_backend",
    "configure_device",
    "destroy_group",
    "group_device",
    "init_group",
]

BACKENDS = ("gloo", "nccl")
_REQUIRED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
#: Least time ranks wait for each other at start-up, whatever ``--timeout`` is.
RENDEZVOUS_TIMEOUT_S = 600.0
#: Set before an NCCL process group is created (torchrun's own ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` is
#: overridden): on an error NCCL's watchdog aborts the communicators but not the process (2, CleanUpOnly), so
#: the error is raised in the rank's main thread and reported in one line instead of a SIGABRT.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
#: ``NCCL error in: /path/NCCLUtils.cpp:77, `` opening an NCCL exception: where, not what.
_NCCL_SOURCE = re.compile(r"^NCCL error in: \S+:\d+,\s*")


def _env_int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None:
        if default is None:
            raise BackendError(f"environment variable {key} is not set; launch with tprun or torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise BackendError(f"environment variable {key}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class DistEnv:
    """This process's position in the job, read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (with defaults)."""
        env = os.environ if environ is None else environ
        rank = _env_int(env, "RANK")
        world = _env_int(env, "WORLD_SIZE")
        local_rank = _env_int(env, "LOCAL_RANK", rank)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
        if not 0 <= rank < world:
            raise BackendError(f"RANK={rank} is out of range for WORLD_SIZE={world}")
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def _cuda_device(device: str | None, local_rank: int, local_world_size: int, share: bool) -> torch.device:
    """``cuda:LOCAL_RANK`` among the visible GPUs (``CUDA_VISIBLE_DEVICES`` renumbers them from 0), or the
    index ``device`` names; with ``share`` (an explicit ``--device cuda``), ranks beyond the visible GPUs
    share them round-robin (``LOCAL_RANK % count``: one GPU per node, or one visible GPU per rank)."""
    if not torch.cuda.is_available():
        raise BackendError("CUDA was requested but is not available; use --backend gloo --device cpu")
    count = torch.cuda.device_count()
    parsed = torch.device(device) if device is not None else None
    if parsed is not None and parsed.index is not None:
        index = parsed.index
    elif local_rank < count or not share:
        index = local_rank
    else:
        index = local_rank % count
    if index >= count:
        raise BackendError(
            f"rank needs cuda:{index} but only {count} GPU(s) are visible for {local_world_size} local "
            "ranks; lower the tp degree, pass --device cuda to let ranks share GPUs, or use --device cpu"
        )
    return torch.device("cuda", index)


def choose_backend(
    tp: int,
    requested: str | None = None,
    device: str | None = None,
    *,
    local_rank: int | None = None,
    local_world_size: int | None = None,
) -> tuple[str, torch.device]:
    """Pick the collective backend and run device for this process.

    Default: NCCL on ``cuda:LOCAL_RANK`` when CUDA is available and every local rank has a GPU of its
    own, else gloo on CPU.  ``requested`` (``"gloo"``/``"nccl"``) and ``device`` (``"cpu"``, ``"cuda"``,
    ``"cuda:N"``) override the choice; an explicit CUDA device lets more local ranks than GPUs share
    them.  ``local_rank`` / ``local_world_size`` default to ``LOCAL_RANK`` (0) / ``LOCAL_WORLD_SIZE``
    (``tp``) from the environment.

    Raises:
        BackendError: unknown backend, or a combination that cannot work.
    """
    if requested is not None and requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    lrank = local_rank if local_rank is not None else _env_int(os.environ, "LOCAL_RANK", 0)
    lws = local_world_size if local_world_size is not None else _env_int(os.environ, "LOCAL_WORLD_SIZE", tp)
    dev_type = torch.device(device).type if device is not None else None
    if dev_type not in (None, "cpu", "cuda"):
        raise BackendError(f"unsupported device {device!r}; use cpu or cuda")

    if requested is None and dev_type is None:
        if torch.cuda.is_available() and torch.cuda.device_count() >= lws:
            return "nccl", _cuda_device(None, lrank, lws, share=False)
        return "gloo", torch.device("cpu")
    if requested == "nccl" or (requested is None and dev_type == "cuda"):
        if dev_type == "cpu":
            raise BackendError("backend nccl cannot run on device cpu; use --backend gloo or --device cuda")
        return "nccl", _cuda_device(device, lrank, lws, share=dev_type == "cuda")
    # gloo, explicitly requested or implied by --device cpu
    if dev_type == "cuda":
        return "gloo", _cuda_device(device, lrank, lws, share=True)
    return "gloo", torch.device("cpu")


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a rank of the initialised ``group`` runs on when its caller names none (``CausalLM.load``
    under torchrun): ``cuda:LOCAL_RANK`` when the group runs NCCL, else CPU.

    Raises:
        BackendError: the group runs NCCL but this rank has no visible GPU.
    """
    if "nccl" not in str(dist.get_backend(group)):
        return torch.device("cpu")
    _, device = choose_backend(dist.get_world_size(group), "nccl", "cuda")
    return device


def configure_device(device: torch.device, local_world_size: int) -> None:
    """Select the CUDA device, or split this process's CPUs evenly between local ranks (a rank pinned to
    its own cores by ``--cpu-bind`` runs one thread per core it was given)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(rank_threads(local_world_size))


def init_group(
    backend: str, device: torch.device, timeout_s: float, *, local_world_size: int | None = None
) -> str:
    """Initialise the default process group via ``env://`` and return its name.

    Ranks wait up to ``max(timeout_s, RENDEZVOUS_TIMEOUT_S)`` for each other to join; then every
    collective on the group fails after ``timeout_s`` seconds.

    Raises:
        BackendError: rendezvous variables are missing or initialisation fails.
    """
    env = os.environ
    missing = [k for k in _REQUIRED_ENV if k not in env]
    if missing:
        raise BackendError(
            f"environment variable(s) {', '.join(missing)} not set; launch with tprun or torchrun"
        )
    lws = local_world_size
    if lws is None:
        lws = _env_int(env, "LOCAL_WORLD_SIZE", int(env["WORLD_SIZE"]))
    configure_device(device, lws)
    collective_timeout = timeout_s
    if backend == "nccl":
        os.environ.update(NCCL_ENV)
        collective_timeout += NCCL_TIMEOUT_GRACE_S
    # Ranks may finish loading their shards far apart: only the collectives get the short timeout.
    rendezvous = timedelta(seconds=max(timeout_s, RENDEZVOUS_TIMEOUT_S))
    try:
        if device.type == "cuda" and backend == "nccl":
            dist.init_process_group(backend=backend, timeout=rendezvous, device_id=device)
        else:
            dist.init_process_group(backend=backend, timeout=rendezvous)
    except Exception as exc:
        hint, gpus = "", torch.cuda.device_count() if backend == "nccl" else lws
        if gpus < lws:
            hint = f" ({lws} local ranks share {gpus} GPU(s); NCCL needs a GPU per rank: use --backend gloo)"
        raise BackendError(f"cannot initialise {backend} process group: {first_line(exc)}{hint}") from exc
    world = dist.group.WORLD
    if world is None:  # pragma: no cover - init_process_group guarantees it
        raise BackendError("process group initialised but WORLD group is missing")
    distributed_c10d._set_pg_timeout(timedelta(seconds=collective_timeout), world)
    return world.group_name


def backend_failure(exc: BaseException) -> BaseException:
    """``exc`` itself, or, for a collective backend's error (``torch.distributed.DistError``: NCCL aborted
    its communicator, a peer's connection is gone), the one-line :class:`CollectiveError` (exit 1) for it."""
    if not isinstance(exc, dist.DistError):
        return exc
    line = _NCCL_SOURCE.sub("NCCL error: ", first_line(exc), count=1)
    if "timeout" in line.lower() or "timed out" in line.lower():
        line += " (raise --timeout if a rank is legitimately this slow)"
    return CollectiveError(f"collective failed: {line}")


def destroy_group() -> None:
    """Tear down the default process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
