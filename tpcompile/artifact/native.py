"""Native rank programs: each rank's program compiled ahead of time by AOTInductor into a package of
native code (``rank{r}/native.pt2``), so that ``tprun`` runs a step without a Python call per op and
without compiling anything on the first run.

Invariants:
- a package computes exactly its rank's program: the same graph, re-captured with the same dynamic input
  dims (one package serves prefill and decode), with the collectives replaced by the runtime's transport
  ops (``tpcompile::all_reduce_sum`` / ``tpcompile::all_gather``: the same transport the eager program
  uses, shared memory or the process group), masked attention by ``tpcompile::prefix_attention``
  (attention over the written part of the KV cache only) and linears by ``tpcompile::streaming_linear``
  (the decode matrix-vector kernel; more rows go to ``aten.linear``): all three run the runtime's C++
  kernels (``runtime/kernels/cpu_ops.cpp``) without a Python call, through their C shims
  (``cpu_ops.C_SHIMS``: a direct call, not the package's boxing proxy executor); packed (quantized)
  weights are bound to ``tpcompile::quant_linear`` / ``quant_embedding`` exactly as the runtime binds them
  (``runtime/load/quantized.py``), so a package reads them packed too (through ``quant.C_SHIMS``);
- a package holds no weights: the runtime binds the rank's own tensors to it (no copy, and the KV cache
  stays in place, shared with the eager program);
- it is built for the target recorded in the manifest (``extra.native``): the CPU architecture, the vector
  ISA its kernels use (AVX2 on x86-64, so one artifact runs on every x86-64 host with AVX2, AVX-512 or not)
  and the torch version it links against. A host that cannot run it falls back to the eager program.
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpcompile.artifact.program import drop_derived_value_bounds
from tpcompile.artifact.workers import job_failure, worker_pool
from tpcompile.runtime.format import PROGRAM_FILE, WEIGHTS_FILE
from tpcompile.runtime.format.native_section import NATIVE_FILE, NativeSection, NativeTarget
from tpcompile.runtime.format.quant_section import QuantSection
from tpcompile.runtime.kernels.compiled import use_transport_ops
from tpcompile.runtime.kernels.cpu_ops import C_SHIMS
from tpcompile.runtime.kernels.prefix_attention import use_prefix_attention
from tpcompile.runtime.kernels.quant import C_SHIMS as QUANT_C_SHIMS
from tpcompile.runtime.kernels.streaming_linear import streaming_linear as _linear_op  # noqa: F401
from tpcompile.runtime.load.graph_reader import program_module
from tpcompile.runtime.load.graph_rewrite import retarget_calls
from tpcompile.runtime.load.mapped import map_safetensors
from tpcompile.runtime.load.quantized import bind_packed_weights
from tpcompile.runtime.load.weights import assign_tensors, create_zero_state

Progress = Callable[[str], None]

#: Vector width of the generated kernels per architecture (bits); None: the compiler's default.
_SIMD_BITS = {"x86_64": 256}  # AVX2 (+FMA): every x86-64 host of the kind has it, AVX-512 or not
#: The -march all of a package's C++ (kernels and wrapper) is built for, per architecture. Without it
#: Inductor passes -march=native, which ties a package to the build host's CPU model (AVX-512 code on an
#: AVX-512 build host: an illegal instruction on the AVX2 hosts its manifest says it runs on).
_MARCH = {"x86_64": "x86-64-v3"}
#: The CPU flags (as /proc/cpuinfo names them) of that level: x86-64-v3 is AVX, AVX2, BMI1, BMI2, F16C,
#: FMA, LZCNT (``abm``), MOVBE and XSAVE.
_ISA_FLAGS = {"x86_64": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")}


_LINEAR = torch.ops.aten.linear.default


def _linear_args(node: torch.fx.Node) -> tuple[tuple[object, ...], dict[str, object]]:
    """``linear(x, w[, b])`` as ``tpcompile::streaming_linear(x, w, b)`` takes it (the bias explicit)."""
    x, weight, *rest = node.args
    return (x, weight, rest[0] if rest else node.kwargs.get("bias")), {}


def native_target() -> NativeTarget:
    """What this compiler builds packages for: this machine's architecture, the portable ISA of it."""
    arch = platform.machine().lower()
    arch = "x86_64" if arch in ("amd64", "x86_64") else arch
    return NativeTarget("cpu", arch, _ISA_FLAGS.get(arch, ()), torch.__version__)


def _inductor_configs(arch: str, threads: int) -> dict[str, Any]:
    configs: dict[str, Any] = {
        "aot_inductor.package_constants_in_so": False,  # the rank's weights stay in its safetensors
        "compile_threads": threads,
        # not cpp.enable_kernel_profile: a profiler mark around every kernel cost 15-20% of a SmolLM2 step
    }
    bits = _SIMD_BITS.get(arch)
    if bits is not None:
        configs["cpp.simdlen"] = bits
    march = _MARCH.get(arch)
    if march is not None:
        configs["cpp.march"] = march
    return configs


@dataclass(frozen=True)
class NativeJob:
    """Everything a worker needs to compile one rank: the artifact being written and the program's inputs."""

    out: Path
    zero_state: tuple[str, ...]
    examples: tuple[torch.Tensor, ...]
    dynamic: Any
    target: NativeTarget
    threads: int
    quant: QuantSection | None = None

    def run(self, rank: int) -> None:
        with warnings.catch_warnings(), _without_stack_traces():  # torch's chatter is not the user's business
            warnings.simplefilter("ignore")
            self._compile(rank)

    def _compile(self, rank: int) -> None:
        rank_dir = self.out / f"rank{rank}"
        module = program_module(rank_dir / PROGRAM_FILE)  # as tprun reads it: ~6 s sooner a SmolLM2 rank
        tensors = dict(map_safetensors(rank_dir / WEIGHTS_FILE))
        if self.quant is not None:
            bind_packed_weights(module, tensors, self.quant, f"rank{rank}/{WEIGHTS_FILE}")
        assign_tensors(module, tensors, f"rank{rank}/{WEIGHTS_FILE}")
        create_zero_state(module, self.zero_state, torch.device("cpu"))
        use_transport_ops(module)
        use_prefix_attention(module, custom_op=True)
        retarget_calls(module, _LINEAR, torch.ops.tpcompile.streaming_linear.default, _linear_args)
        with torch.no_grad():
            native = torch.export.export(module, self.examples, dynamic_shapes=self.dynamic, strict=False)
        drop_derived_value_bounds(native, self.dynamic)
        declared = {**C_SHIMS, **QUANT_C_SHIMS}
        shims = {getattr(torch.ops.tpcompile, op).default: [decl] for op, decl in declared.items()}
        with torch._inductor.config.patch({"aot_inductor.custom_ops_to_c_shims": shims}):
            torch._inductor.aoti_compile_and_package(
                native,
                package_path=str(rank_dir / NATIVE_FILE),
                inductor_configs=_inductor_configs(self.target.arch, self.threads),
            )


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    """Tracing without recording each node's Python stack: a package's graph is the rank program's, whose
    source lines the compiler already checked. Capturing a stack per traced node (``CapturedTraceback``,
    mostly in AOTAutograd's trace) cost a SmolLM2 tp=2 compile with its ranks one after the other 190 s of
    CPU against 162 without (2026-12-03)."""
    saved = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = saved


def _compile_in_worker(task: tuple[NativeJob, int]) -> int | BaseException:
    job, rank = task
    try:
        job.run(rank)
    except Exception as err:  # crosses to the compiler as a value (see artifact/workers.py)
        return job_failure(err, f"compiling rank {rank}'s native program (--no-native skips it)")
    return rank


def compile_native(
    out: Path,
    tp: int,
    zero_state: set[str],
    examples: list[torch.Tensor],
    dynamic: Any,
    say: Progress,
    quant: QuantSection | None = None,
) -> NativeSection:
    """Compile every rank of the artifact being written in ``out``; return the manifest's native section.
    Each package is ``rank{r}/native.pt2``. Ranks compile in spawned workers, one per core (a fork of the
    compiler, which runs threads by now, can deadlock in the C++ compiler's startup); like every worker
    of a compile they die with it."""
    cores = os.cpu_count() or 1
    workers = min(tp, cores)
    if workers < 2 or os.environ.get("TPCOMPILE_JOBS") == "1":
        workers = 0
    target = native_target()
    threads = max(1, cores // max(1, workers))
    job = NativeJob(out, tuple(sorted(zero_state)), tuple(examples), dynamic, target, threads, quant)
    with worker_pool(_compile_in_worker, [(job, r) for r in range(tp)], workers, "spawn") as pool:
        for _, result in pool.results(share=workers == 0):
            if isinstance(result, BaseException):
                raise result
            say(f"rank {result}: native program compiled")
    return NativeSection(target, {r: NATIVE_FILE for r in range(tp)})
