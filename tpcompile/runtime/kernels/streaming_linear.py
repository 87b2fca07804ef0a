"""A matrix-vector kernel for decode steps on CPU, built with the host's C compiler on first use.

A decode step multiplies a handful of activation rows by every weight matrix, so its speed is how fast
the weights stream from memory.  BLAS ``sgemv`` (MKL and OpenBLAS alike) reads a row-major ``[out, in]``
weight at 11-15 GB/s on the machines this was measured on, while a plain loop that walks each weight row
once with four independent vector accumulators reads it at 17-21 GB/s (through this module): the whole
matrix is one sequential stream and the additions do not wait on each other.  This module compiles that
loop (portable C with GCC vector extensions, ``-O3 -march=native``) into a small shared library cached per
source and CPU, and calls it through ``ctypes``.  The loop runs on one thread, so it is used only while
torch runs one intra-op thread (a rank per core, as ``tprun`` sets it up at tp = cores); with more threads
BLAS spreads a product over them and is left to do so.

Invariants:
- only the rewrite target changes speed, never results beyond fp32 round-off: every output element is one
  dot product of a weight row with an activation row, accumulated in float32 in a fixed order, plus the
  bias; the same inputs give bit-identical outputs on every call and every rank;
- a program on any other device than the CPU is never rewritten (:func:`use_streaming_linear`); at run
  time anything the kernel does not handle (not CPU, not float32, a non-contiguous weight, more than
  :data:`MAX_ROWS` activation rows, more than one torch thread, no compiler, ``TPCOMPILE_CPU_KERNELS=0``)
  goes to ``F.linear``;
- a failed build is not an error: the library is simply unavailable and ``F.linear`` is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F

from ..load.graph_rewrite import retarget_calls, tensors_on_cpu

__all__ = ["MAX_ROWS", "decode_linear", "kernel_available", "use_streaming_linear"]

#: Above this many activation rows (a prompt), BLAS matrix-matrix products are faster.
MAX_ROWS = 8

_SOURCE = r"""
/* 16-float lane groups built from the host's own vectors (one AVX-512 register, two AVX ones, four SSE/NEON
   ones): GCC lowers a 64-byte vector through the stack on a host without AVX-512. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#define PARTS (16 / LANES)
typedef float vec __attribute__((vector_size(LANES * 4)));

static inline vec load(const float *p) { vec v; __builtin_memcpy(&v, p, sizeof v); return v; }

/* Four 16-lane accumulators (one per 16 floats of each 64), added pairwise, then the lanes in order: the
   same sums on every host. */
static inline float dot(const float *w, const float *x, long k_total) {
    vec a[4 * PARTS];
    for (int j = 0; j < 4 * PARTS; j++) a[j] = (vec){0};
    long k = 0;
    for (; k + 64 <= k_total; k += 64)
        for (int j = 0; j < 4 * PARTS; j++) a[j] += load(w + k + j * LANES) * load(x + k + j * LANES);
    for (; k + 16 <= k_total; k += 16)
        for (int p = 0; p < PARTS; p++) a[p] += load(w + k + p * LANES) * load(x + k + p * LANES);
    float s = 0.0f;
    for (int p = 0; p < PARTS; p++) {
        vec t = (a[p] + a[PARTS + p]) + (a[2 * PARTS + p] + a[3 * PARTS + p]);
        for (int l = 0; l < LANES; l++) s += t[l];
    }
    for (; k < k_total; k++) s += w[k] * x[k];
    return s;
}

/* y[m, o] = sum_k x[m, k] * w[o, k] (+ bias[o]); w is row-major [n_out, k_total], x and y row-major. */
void tpc_linear_f32(const float *w, const float *x, const float *bias, float *y,
                    long n_out, long k_total, long rows) {
    for (long o = 0; o < n_out; o++) {
        const float *wr = w + o * k_total;
        for (long m = 0; m < rows; m++) {
            float s = dot(wr, x + m * k_total, k_total);
            y[m * n_out + o] = bias ? s + bias[o] : s;
        }
    }
}
"""

_LIB: ctypes.CDLL | None = None
_TRIED = False


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (a cached library is per CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join([platform.machine(), *keep])


def _cache_dir() -> Path:
    root = os.environ.get("TPCOMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpcompile"
    )
    return Path(root) / "kernels"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "gemv.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(out, target)  # atomic: ranks building at once each install a complete file


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(f"{_SOURCE}\n{_cpu_signature()}\n{compiler}".encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.tpc_linear_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    return lib


def kernel_available() -> bool:
    """Build (once per process) and load the kernel; False where it cannot be used."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        if os.environ.get("TPCOMPILE_CPU_KERNELS", "1") != "0" and platform.system() == "Linux":
            _LIB = _load()
    return _LIB is not None


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the streaming kernel when ``x`` has few rows."""
    k_total = (
        weight.shape[-1] if weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[-1] else 0
    )
    rows = x.numel() // k_total if k_total else 0  # 0: a shape F.linear must judge (and reject)
    if (
        _LIB is None
        or rows == 0
        or rows > MAX_ROWS
        or torch.get_num_threads() != 1
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or (bias is not None and bias.device.type != "cpu")
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or not weight.is_contiguous()
        or (
            bias is not None
            and (bias.dtype != torch.float32 or bias.shape != weight.shape[:1] or not bias.is_contiguous())
        )
        or x.requires_grad
        or weight.requires_grad
    ):
        return F.linear(x, weight, bias)
    xc = x.contiguous()
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)
    _LIB.tpc_linear_f32(
        weight.data_ptr(),
        xc.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        weight.shape[0],
        k_total,
        rows,
    )
    return out


@torch.library.custom_op("tpcompile::streaming_linear", mutates_args=())
def streaming_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`decode_linear` as an opaque op, so that an Inductor-compiled step calls the kernel too."""
    return decode_linear(x, weight, bias)


@streaming_linear.register_fake
def _streaming_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LINEAR = torch.ops.aten.linear.default


def _op_args(node: torch.fx.Node) -> tuple[tuple[object, ...], dict[str, object]]:
    x, weight, *rest = node.args
    return (x, weight, rest[0] if rest else node.kwargs.get("bias")), {}


def use_streaming_linear(module: torch.nn.Module, *, custom_op: bool = False) -> int:
    """Point every ``aten.linear`` of ``module``'s graphs at the kernel (:func:`decode_linear`, or the
    ``tpcompile::streaming_linear`` op when the graph is to be compiled); return how many.

    Does nothing (returns 0) for a module whose tensors are not all on the CPU (a GPU rank never builds
    the kernel, and Inductor keeps fusing its linears), when torch runs more than one thread, or when the
    kernel cannot be built here.
    """
    if not tensors_on_cpu(module) or torch.get_num_threads() != 1 or not kernel_available():
        return 0
    if custom_op:
        return retarget_calls(module, _LINEAR, torch.ops.tpcompile.streaming_linear.default, _op_args)
    return retarget_calls(module, _LINEAR, decode_linear)
