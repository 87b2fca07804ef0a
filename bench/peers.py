"""Peers measured beside tpcompile in the same run: llama.cpp (through llama-cpp-python) on a GGUF file.

llama-cpp-python builds llama.cpp from source (15-25 minutes on 2 cores), so it lives in its own virtual
environment outside the repository, never in the project's: the benchmark runs it through that
environment's Python (``$TPCOMPILE_LLAMA_CPP_PYTHON``, default ``~/.cache/tpcompile-bench/llama-venv``)
and skips it with a note when it is absent. Set it up once with::

    python3 -m venv ~/.cache/tpcompile-bench/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        ~/.cache/tpcompile-bench/llama-venv/bin/pip install llama-cpp-python

(On an AMX host the default native build of llama-cpp-python 0.3.36 crashed on the Q4_1 file with a
segmentation fault in decode; without AMX it runs. Drop the AVX-512 flags on an AVX2-only host.) To compare
the AVX2 code paths of both on an AVX-512 host, build a second environment with ``-DGGML_AVX512=OFF`` and
run the benchmark with ``TPCOMPILE_LLAMA_CPP_PYTHON`` pointing at it and ``TPCOMPILE_CPU_ISA=x86-64-v3``
(tpcompile's kernels built for AVX2 + FMA only; the table's host line says so). Build the second one with
``pip install --no-cache-dir``: pip's wheel cache does not key on ``CMAKE_ARGS``, so it would install the
first build's wheel again, silently.

Not a test: the numbers depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_VENV = Path.home() / ".cache" / "tpcompile-bench" / "llama-venv"
JSON_TAG = "PEER_JSON "

# Runs inside the llama-cpp-python environment: greedy decoding of given token ids, timed per token.
_LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, ctx, max_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.argv[5])
llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
times, new = [], []
start = time.perf_counter()
for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
    times.append(time.perf_counter())
    new.append(int(token))
    if len(new) >= max_new or llm.token_eos() == token:
        break
decode = (len(new) - 1) / (times[-1] - times[0]) if len(new) > 1 else 0.0
print("PEER_JSON " + json.dumps(dict(decode=decode, ttft=times[0] - start, new_tokens=len(new), new_ids=new)))
"""


def llama_cpp_python() -> tuple[Path | None, str]:
    """(the Python of an environment with llama-cpp-python, or None; a note saying which or why not)."""
    python = Path(os.environ.get("TPCOMPILE_LLAMA_CPP_PYTHON") or DEFAULT_VENV / "bin" / "python")
    if not python.exists():
        return None, f"llama.cpp skipped: no {python} (see bench/peers.py to set it up)"
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return None, f"llama.cpp skipped: {python} cannot import llama_cpp"
    return python, f"llama-cpp-python {probe.stdout.strip()} ({python})"


def write_f32_gguf(source: Path, out: Path) -> Path:
    """A copy of the GGUF file ``source`` with every tensor dequantized to F32 (same names, same metadata,
    file type F32): llama.cpp then reads exactly the fp32 weights tpcompile's artifacts hold."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(0)  # ALL_F32
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.tensor_type != GGMLQuantizationType.F32:
            data = dequantize(data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_cpp_generate(
    python: Path, gguf: Path, prompt_ids: list[int], threads: int, max_new: int, ctx: int
) -> dict[str, Any]:
    """One greedy generation with llama.cpp in a fresh process: decode tokens/s, time to first token,
    new ids. Raises RuntimeError when it fails."""
    cmd = [str(python), "-c", _LLAMA_SCRIPT, str(gguf), str(threads), str(ctx), str(max_new)]
    proc = subprocess.run([*cmd, json.dumps(prompt_ids)], capture_output=True, text=True, timeout=1800)
    found = [ln[len(JSON_TAG) :] for ln in proc.stdout.splitlines() if ln.startswith(JSON_TAG)]
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"llama.cpp failed: {last}")
    result: dict[str, Any] = json.loads(found[0])
    return result
