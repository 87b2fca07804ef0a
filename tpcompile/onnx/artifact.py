"""Turning a torch-format artifact's ranks into ONNX segments (``tpcompile ... --format onnx``).

Per rank: load ``program.pt2``, make its KV cache explicit (:mod:`tpcompile.onnx.functional`), export it
with collectives as ``tpcompile`` nodes (:mod:`tpcompile.onnx.export`), cut it at those nodes
(:mod:`tpcompile.onnx.segments`) and drop ``program.pt2``. Invariant: afterwards each rank directory holds
``weights.safetensors`` (the same tensors, realigned so that onnxruntime memory-maps them: see
:mod:`tpcompile.onnx.aligned`; also the segments' external data) and ``segment{i}.onnx``, and the manifest
says ``format: onnx`` and lists every rank's steps under ``extra.onnx``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tpcompile.artifact.workers import job_failure, worker_pool
from tpcompile.artifact.writer import atomic_directory
from tpcompile.errors import UsageError
from tpcompile.onnx.aligned import align_safetensors
from tpcompile.onnx.export import DOMAIN, OPSET, export_model
from tpcompile.onnx.functional import stateful_module
from tpcompile.onnx.segments import split_model
from tpcompile.runtime.format import FORMAT_ONNX, PROGRAM_FILE, WEIGHTS_FILE, Manifest, sha256_file
from tpcompile.runtime.format.onnx_section import OnnxRank
from tpcompile.runtime.format.quant_section import quant_section
from tpcompile.runtime.load.exported_load import load_exported


def convert_rank(rank_dir: Path, zero_state: set[str]) -> tuple[OnnxRank, list[Path]]:
    """Write ``rank_dir``'s segments; return the rank's steps and the segment files."""
    program = load_exported(rank_dir / PROGRAM_FILE)
    align_safetensors(rank_dir / WEIGHTS_FILE)
    stateful = stateful_module(program, zero_state)
    model = export_model(stateful, rank_dir / WEIGHTS_FILE)
    return split_model(model, rank_dir)


Job = tuple[Path, list[str], str]  # (artifact dir, zero_state, rank dir)
#: (rank dir, its steps, its segment files) or the failure, as it crosses from a worker to the compiler: a
#: typed compiler error or an ``OSError`` (a full disk) as it is, anything else as one line
Result = tuple[str, dict[str, Any], list[str]] | BaseException


def _convert_in_worker(job: Job) -> Result:
    out, zero_state, rank_dir = job
    try:
        graph, files = convert_rank(out / rank_dir, set(zero_state))
    except Exception as err:
        return job_failure(err, f"converting {rank_dir} to ONNX")
    return rank_dir, graph.to_json(), [f.name for f in files]


def _convert_all(
    out: Path, dirs: list[str], zero_state: set[str]
) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    """Convert the rank directories, in worker processes (one per core) when there are several. They are
    spawned, not forked: a fork of the compiler (which has helper threads by now) can inherit a held lock
    and hang. Like every worker of a compile (:mod:`tpcompile.artifact.workers`), they die with it."""
    jobs: list[Job] = [(out, sorted(zero_state), d) for d in dirs]
    workers = min(len(dirs), os.cpu_count() or 1)
    if workers < 2 or os.environ.get("TPCOMPILE_JOBS") == "1":
        workers = 0
    with worker_pool(_convert_in_worker, jobs, workers, "spawn") as pool:
        for _, result in pool.results(share=False):
            if isinstance(result, BaseException):
                raise result
            yield result


def to_onnx(out: Path, manifest: Manifest, progress: Callable[[str], None] | None = None) -> None:
    """Convert every rank of the artifact being written in ``out`` and update ``manifest`` in place."""
    say = progress or (lambda _msg: None)
    ranks = {}
    entries = {e.dir: e for e in manifest.ranks}
    for rank_dir, graph, files in _convert_all(out, list(entries), set(manifest.zero_state)):
        entry = entries[rank_dir]
        (out / rank_dir / PROGRAM_FILE).unlink()
        entry.files = {f: sha256_file(out / rank_dir / f) for f in [*files, WEIGHTS_FILE]}
        ranks[str(entry.rank)] = graph
        say(f"rank {entry.rank}: {len(files)} ONNX segments written")
    manifest.format = FORMAT_ONNX
    manifest.extra["onnx"] = {"opset": OPSET, "collective_domain": DOMAIN, "ranks": ranks}


def convert_artifact(src: str | Path, dst: str | Path, force: bool = False) -> Manifest:
    """Write an ONNX-format copy of the torch-format artifact ``src`` to ``dst``."""
    src, dst = Path(src), Path(dst)
    manifest = Manifest.read(src / "manifest.json")
    if manifest.format != "torch":
        raise UsageError(f"{src} is already a {manifest.format}-format artifact")
    quant = quant_section(manifest.extra, str(src))
    if quant is not None and quant.tensors:
        raise UsageError(
            f"{src} stores {len(quant.tensors)} weights quantized and ONNX cannot run quantized weights yet; "
            "recompile it with --dequantize"
        )
    with atomic_directory(dst, force) as tmp:
        for path in sorted(src.rglob("*")):
            target = tmp / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.name != "manifest.json":
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # not a hard link: ONNX loaders refuse linked external data
        to_onnx(tmp, manifest)
        (tmp / "manifest.json").write_text(manifest.to_json())
    return manifest
