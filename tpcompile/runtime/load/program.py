"""A loaded rank: :class:`RankProgram`, the program every artifact format loads into.

Invariant: calling a rank program runs one forward pass and returns the flat outputs in manifest order;
every rank of the artifact calls it collectively (the program contains collectives). A rank program with
a native program bound (``native``: the rank's AOTInductor package, bound to the same tensors) runs that
instead of its eager module; both compute the same outputs and write the same KV cache.  The torch format
(:mod:`~tpcompile.runtime.load.loader`) and the ONNX format (:mod:`tpcompile.runtime.onnx.program`) both
produce one, so this module imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import ArtifactLoadError
from ..format import Manifest, TensorSpec
from ..transport.shm import ShmCommunicator, rebind_collectives
from .graph_rewrite import rewrite_collective_groups
from .tensor_io import order_inputs

__all__ = ["RankProgram"]


class RankProgram:
    """One rank's compiled program with its weights attached, ready to run.

    Calling it runs the forward pass under ``torch.inference_mode()`` and
    returns the flattened outputs, in manifest output order.  Every rank of
    the artifact must call it collectively (the program contains collectives).
    """

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        device: torch.device,
        module: nn.Module,
        group_name: str,
    ) -> None:
        self.manifest = manifest
        self.rank = rank
        self.device = device
        self.module = module
        self.group_name = group_name
        #: the rank's native program (``tpcompile.runtime.kernels.native``), when one is bound
        self.native: Callable[..., list[torch.Tensor]] | None = None
        #: why the artifact's native program is not bound on this host (None: bound, or there is none)
        self.native_unused: str | None = None

    @property
    def input_specs(self) -> Sequence[TensorSpec]:
        """Positional inputs the program expects."""
        return self.manifest.inputs

    @property
    def output_specs(self) -> Sequence[TensorSpec]:
        """Outputs the program returns, in order."""
        return self.manifest.outputs

    def bind_group(self, group_name: str) -> int:
        """Point the program's collectives at process group ``group_name``.

        Returns the number of collective nodes rewritten.
        """
        count = rewrite_collective_groups(self.module, self.group_name, group_name)
        self.group_name = group_name
        return count

    def use_shared_memory(self, comm: ShmCommunicator) -> int:
        """Same-host ranks: run the program's collectives through ``comm`` (tensors too large for a slot
        still use the bound group); returns how many collectives were rebound."""
        return rebind_collectives(self.module, comm, self.group_name)

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run the forward pass on positional ``inputs``; return the flat outputs."""
        moved = [t.to(self.device) for t in inputs]
        if self.native is not None:
            leaves = self.native(*moved)
        else:
            with torch.inference_mode():
                result = self.module(*moved)
            leaves, _ = tree_flatten(result)
        expected = len(self.manifest.outputs)
        if len(leaves) != expected:
            raise ArtifactLoadError(
                f"program of rank {self.rank} returned {len(leaves)} outputs but the manifest "
                f"lists {expected}; the artifact is inconsistent, recompile it"
            )
        for spec, leaf in zip(self.manifest.outputs, leaves, strict=True):
            if not isinstance(leaf, torch.Tensor):
                raise ArtifactLoadError(
                    f"program output {spec.name!r} is {type(leaf).__name__}, not a tensor"
                )
        return leaves

    def run_named(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validate named ``inputs`` against the manifest, run, and name the outputs."""
        ordered = order_inputs(self.manifest.inputs, inputs)
        outputs = self(*ordered)
        return {spec.name: t for spec, t in zip(self.manifest.outputs, outputs, strict=True)}
