"""onnxruntime sessions for a rank's segments, and torch <-> OrtValue hand-over without copies.

Tensors cross between torch and onnxruntime through DLPack (``OrtValue.from_dlpack`` /
``torch.from_dlpack``), which shares memory on every device the provider supports. Invariant: a segment
reads its inputs from and returns its outputs in device memory of the run device; nothing is copied to
the host between segments. Weights stay memory-mapped from the rank's ``weights.safetensors`` (its
tensors are page-aligned, as the ONNX spec recommends): onnxruntime neither prepacks them nor folds the
``Transpose`` in front of a ``MatMul`` into a private copy (it fuses the pair into one ``FusedMatMul``
that reads the mapped weight).

A rank has about two segments per layer (one between each pair of collectives), each its own session: the
collectives are torch calls between them, which stock onnxruntime cannot run inside a graph.  So that
they do not each grow an arena of their own (on CUDA: ~2 per layer, each holding device memory), every
session of the process allocates from one shared arena per device (:func:`shared_arena`, onnxruntime's
environment allocators), where this onnxruntime build offers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactLoadError, BackendError, first_line

__all__ = ["DISABLED_OPTIMIZERS", "SegmentSession", "import_onnxruntime", "session_options", "shared_arena"]

# constant folding would copy every transposed weight out of the mapped file (see the module docstring)
DISABLED_OPTIMIZERS = ["ConstantFolding"]


def import_onnxruntime() -> Any:
    """The onnxruntime module; BackendError with the install hint when it is missing."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            "this artifact is in the ONNX format and needs onnxruntime: pip install 'tpcompile[onnx]' "
            "(or 'tpcompile[onnx-gpu]' for CUDA)"
        ) from exc
    return onnxruntime


def _both_onnxruntimes() -> bool:
    """True when the CPU and the GPU onnxruntime packages are both installed (they overwrite each other)."""
    from importlib import metadata

    def installed(name: str) -> bool:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            return False
        return True

    return installed("onnxruntime") and installed("onnxruntime-gpu")


def _providers(ort: Any, device: torch.device) -> list[Any]:
    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            fix = "pip install 'tpcompile[onnx-gpu]' (onnxruntime-gpu)"
            if _both_onnxruntimes():
                fix = "onnxruntime and onnxruntime-gpu are both installed: pip uninstall both, then " + fix
            raise BackendError(f"onnxruntime has no CUDAExecutionProvider: {fix}; or run with --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(index).cuda_stream  # one stream for torch and onnxruntime
        options = {"device_id": index, "user_compute_stream": str(stream)}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    raise BackendError(f"the ONNX format runs on cpu or cuda devices, not {device.type}")


_ARENAS: set[tuple[str, int]] = set()  # devices whose shared arena this process registered


def shared_arena(ort: Any, device: torch.device) -> bool:
    """Register, once per process and device, the arena every segment session on ``device`` allocates
    from; False when this onnxruntime cannot share one (each session then keeps its own)."""
    index = device.index if device.index is not None else 0
    key = (device.type, index)
    if key in _ARENAS:
        return True
    # grow by what is asked rather than by doubling: one arena serves every segment's activations
    config = ort.OrtArenaCfg({"arena_extend_strategy": 1})
    kind, memory = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
    try:
        if device.type == "cuda":
            info = ort.OrtMemoryInfo("Cuda", kind, index, memory)
            options = {"device_id": str(index)}
            ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, options, config)
        else:
            ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", kind, 0, memory), config)
    except Exception:  # an older build, a provider without shared allocators: sessions keep their own
        return False
    _ARENAS.add(key)
    return True


def session_options(ort: Any, shared: bool = False) -> Any:
    """Options of every segment session; ``shared``: allocate from the process's shared arena."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # ranks share the cores: threads that spin while waiting would take them from the other ranks
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.disable_prepacking", "1")  # a packed weight is a private copy
    if shared:
        so.add_session_config_entry("session.use_env_allocators", "1")
    return so


@dataclass
class SegmentSession:
    """One segment: its session, a reusable I/O binding, and the names it reads and writes."""

    session: Any
    binding: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    device_type: str
    device_id: int

    @classmethod
    def open(
        cls, path: Path, rel: str, inputs: tuple[str, ...], outputs: tuple[str, ...], device: torch.device
    ) -> SegmentSession:
        ort = import_onnxruntime()
        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=session_options(ort, shared_arena(ort, device)),
                providers=_providers(ort, device),
                disabled_optimizers=DISABLED_OPTIMIZERS,
            )
        except BackendError:
            raise
        except Exception as exc:
            raise ArtifactLoadError(f"onnxruntime cannot load {rel}: {first_line(exc)}") from exc
        names_in = {i.name for i in session.get_inputs()}
        names_out = {o.name for o in session.get_outputs()}
        if names_in != set(inputs) or names_out != set(outputs):
            raise ArtifactLoadError(f"{rel} does not have the inputs/outputs the manifest lists; recompile")
        index = device.index if device.index is not None else 0
        return cls(session, session.io_binding(), inputs, outputs, device.type, index)

    def run(self, env: Mapping[str, Any], preset: Mapping[str, Any]) -> list[Any]:
        """Run on ``env``'s values (OrtValues or tensors); outputs named in ``preset`` are written into
        those OrtValues, the others are allocated by onnxruntime. Returns the OrtValues, in output order."""
        ort = import_onnxruntime()
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name in self.inputs:
            value = env[name]
            b.bind_ortvalue_input(
                name, value if isinstance(value, ort.OrtValue) else ort.OrtValue.from_dlpack(value)
            )
        for name in self.outputs:
            if name in preset:
                b.bind_ortvalue_output(name, preset[name])
            else:
                b.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(b)
        return list(b.get_outputs())
