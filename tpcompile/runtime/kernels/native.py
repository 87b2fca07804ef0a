"""Running a rank's native program (an AOTInductor package, see ``tpcompile/artifact/native.py``).

Invariants:
- the package is bound to the rank's own tensors (``user_managed``: no copy of any weight, and the KV
  cache it writes is the one the eager program reads), so the two can be used in turn;
- its collectives are the transport ops of :mod:`.compiled`, which must be bound (``bind_transport``)
  before the first call, exactly as for ``tprun --compile``;
- it calls its ops through their C shims (``cpu_ops.C_SHIMS``), so it loads only after the C++ kernel
  library has (on a host that cannot build it, the package is not used);
- a package this host cannot run (another architecture, a missing CPU feature, another torch, a file
  that does not load) is never called: :func:`load_native` returns why, and :func:`settle_native` makes
  every rank run its eager program then (ranks never mix the two kinds), with one line for the user.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import first_line
from ..format.native_section import NativeSection, host_cpu_flags
from ..load.program import RankProgram
from .cpu_ops import KERNELS_OFF, cpu_ops_loaded, load_cpu_ops

__all__ = ["NativeProgram", "load_native", "native_unavailable", "settle_native"]


class NativeProgram:
    """A rank's package with the rank's tensors bound to it: ``program(*inputs) -> flat outputs``."""

    def __init__(self, path: Path, module: nn.Module) -> None:
        self.path = path
        load_cpu_ops()  # before the package: it calls the ops' C shims, which this library defines
        # the package's C++ loader, opened as torch's aoti_load_package opens it, minus its check of the
        # compile host (load_native has checked the ISA the package needs) and without importing
        # torch._inductor, which imports torch._dynamo: ~1.5 s of every rank's start-up
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        state: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
        needed = self.loader.get_constant_fqns()
        missing = [name for name in needed if name not in state]
        if missing:
            raise ValueError(f"the package needs tensor {missing[0]}, which the program does not hold")
        # (constants, into the inactive buffer, check_full_update, user_managed: no copy, allow_h2d_copy)
        self.loader.load_constants({name: state[name] for name in needed}, False, True, True, False)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """The package's flat outputs for its tensor inputs (``boxed_run`` consumes the list it is given)."""
        with torch.inference_mode():
            return list(self.loader.boxed_run(list(inputs)))


def native_unavailable(section: NativeSection, device: torch.device) -> str | None:
    """Why this host (and run device) cannot run the artifact's packages, or None when it can."""
    if device.type != section.target.device:
        return f"it was built for {section.target.device}, this run is on {device.type}"
    arch = platform.machine().lower()
    arch = "x86_64" if arch in ("amd64", "x86_64") else arch
    return section.target.mismatch(arch, host_cpu_flags(), torch.__version__)


def load_native(
    path: Path, module: nn.Module, section: NativeSection, device: torch.device
) -> tuple[NativeProgram | None, str | None]:
    """(the rank's native program, None), or (None, why it cannot run here)."""
    reason = native_unavailable(section, device)
    if reason is None:
        try:
            return NativeProgram(path, module), None
        except Exception as exc:  # a package that does not load: the eager program still runs
            reason = f"{path.name} does not load ({first_line(exc)})"
            if not cpu_ops_loaded():
                reason = f"{path.name} calls the C++ kernels, which could not be built here ({KERNELS_OFF})"
    return None, reason


def settle_native(program: RankProgram, group: dist.ProcessGroup | None = None) -> str | None:
    """Make every rank of ``group`` run the same kind of program: when one rank cannot run its native
    program, all run their eager ones. Collective (when the group has several ranks). Returns the one
    line to tell the user (the same on every rank), or None when there is nothing to say."""
    reason = program.native_unused
    reasons = [reason]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        reasons = [None] * dist.get_world_size(group)
        dist.all_gather_object(reasons, reason, group=group)
    failed = [(rank, why) for rank, why in enumerate(reasons) if why is not None]
    if not failed:
        return None
    program.native = None
    rank, why = failed[0]
    where = "" if len({w for _, w in failed}) == 1 and len(failed) == len(reasons) else f" on rank {rank}"
    advice = "running the eager programs (recompile on this host for speed)"
    return f"native program not used{where}: {why}; {advice}"
