"""Building and loading a C++ kernel library of tpcompile's custom ops on the host that runs them.

A library (``cpu_ops.cpp``, ``quant_ops.cpp``) is compiled on first use with the host's C++ compiler
(``$CXX``, else ``c++`` / ``g++``) against the running torch, for the host's own ISA (``-march=native``) or
``$TPCOMPILE_CPU_ISA`` (a GCC ``-march`` value such as ``x86-64-v3``: AVX2 + FMA, to measure or match an
older host), and loaded with ``torch.ops.load_library``.

Invariants:
- a build is cached in ``$TPCOMPILE_CACHE/kernels`` (default ``~/.cache/tpcompile/kernels``) under a digest
  of the source and the headers beside it (``vector_math.h``), the CPU, the torch version, the compiler and
  the ISA and the flags, and installed atomically (ranks building at once each install a complete file);
- a failed build or load is not an error: the caller keeps its Python kernels (``TPCOMPILE_CPU_KERNELS=0``,
  or a platform other than Linux, skips the build).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

__all__ = ["load_cpp_library"]


def _cache_dir() -> Path:
    root = os.environ.get("TPCOMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tpcompile"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join([platform.machine(), *keep])


def _march() -> str:
    return os.environ.get("TPCOMPILE_CPU_ISA") or "native"


#: ``-fopenmp``: ``at::parallel_for`` in ATen's headers is an OpenMP region; compiled without it, the kernels'
#: loops run on one thread whatever ``torch.set_num_threads`` says (libgomp resolves to torch's own copy,
#: through the rpath below, so the library shares torch's thread pool)
FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")


def _build(compiler: str, source: Path, target: Path) -> None:
    import torch.utils.cpp_extension as cpp_extension  # setuptools with it: ~0.2 s a rank needs only to build

    include = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [
            compiler, *FLAGS, f"-march={_march()}", abi, *include,
            str(source), "-o", str(out), *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs],
            "-lc10", "-ltorch_cpu", "-ltorch",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        os.replace(out, target)


def load_cpp_library(source: Path, name: str) -> bool:
    """Build ``source`` (cached as ``{name}-{digest}.so``) and load it into torch; False where it cannot."""
    if os.environ.get("TPCOMPILE_CPU_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        return False
    key = f"\n{_cpu_signature()}\n{torch.__version__}\n{compiler}\n{_march()}\n{' '.join(FLAGS)}".encode()
    code = b"".join(p.read_bytes() for p in [source, *sorted(source.parent.glob("*.h"))])
    target = _cache_dir() / f"{name}-{hashlib.sha256(code + key).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, source, target)
        # global: a native program (an AOTInductor package) resolves the library's C shims when it loads
        ctypes.CDLL(str(target), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return False
    return True
