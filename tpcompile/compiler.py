"""The compile pipeline: capture -> plan (placement propagation) -> rank weights + rank programs -> manifest.

``compile_model`` is the one entry point used by the CLI and by tests; it reads as the list of stages:

1. ``plan_model``: canonical graph forms (``passes/canonicalize.py``, ``passes/fused.py``), then the plan
   search (``plan/auto.py``) over placement propagation (``passes/propagate.py`` + ``passes/ops/``);
2. ``rank_tensors``: every stored tensor's local shape on every rank;
3. ``write_ranks``: each rank's weight shard (streamed from the source, one slice at a time) while forked
   workers capture each rank's program (``artifact/rank_programs.py``); weights the source holds in a
   quantized block format stay packed (``artifact/packed.py``);
4. ``compile_native``: each rank's program compiled to native code by AOTInductor (``artifact/native.py``;
   skipped with ``native=False`` and for ``--format onnx``);
5. ``build_manifest`` (``artifact/describe.py``), the tokenizer of a language model, the ONNX segments
   (``--format onnx``), and ``manifest.json`` last, in a directory renamed into place (atomic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export.graph_signature import InputKind, OutputKind

from tpcompile.artifact.describe import build_manifest, describe_language_model
from tpcompile.artifact.native import compile_native
from tpcompile.artifact.packed import PackedWeights, describe_packed, packed_weights
from tpcompile.artifact.program import StoredTensor, input_signature
from tpcompile.artifact.rank_programs import RankProgramJob, rank_program_pool
from tpcompile.artifact.safetensors_writer import write_safetensors
from tpcompile.artifact.writer import atomic_directory
from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel
from tpcompile.frontend.hf_model import DTYPES
from tpcompile.passes.canonicalize import drop_no_op_conversions, fold_repeat_kv_into_sdpa
from tpcompile.passes.fused import split_fused_projections
from tpcompile.passes.rule_api import Propagation
from tpcompile.passes.slicing import local_shape, local_tensor
from tpcompile.plan.auto import choose_plan
from tpcompile.plan.experts import DEFAULT_MOE
from tpcompile.plan.spec import PlanFile, ShardingPlan
from tpcompile.plan.weigh import balance_by_bytes, weigh_plans
from tpcompile.runtime.format import (
    FORMAT_ONNX,
    FORMAT_TORCH,
    MANIFEST_NAME,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    Manifest,
    RankEntry,
    sha256_file,
)
from tpcompile.runtime.format.hardware import HardwareProfile
from tpcompile.runtime.format.placement import Pieces, Placement, RootPlacement, Shard

Progress = Callable[[str], None]
FORMATS = (FORMAT_TORCH, FORMAT_ONNX)
#: the generation plans are weighed for (``--profile``): decode after a prompt of this many tokens
WEIGH_PROMPT, WEIGH_NEW_TOKENS = 512, 128


@dataclass
class CompileResult:
    manifest: Manifest
    out: Path
    plan: ShardingPlan
    propagation: Propagation


def plan_model(
    captured: CapturedModel,
    tp: int,
    plan_file: PlanFile | None = None,
    moe: str = DEFAULT_MOE,
    profile: HardwareProfile | None = None,
    comm_dtype: torch.dtype | None = None,
) -> tuple[ShardingPlan, Propagation]:
    """Choose the plan and propagate placements (no files written); with a hardware ``profile``, the exact
    plans the search can make are weighed with the cost model (all-reduces in ``comm_dtype``) and the
    fastest is kept (``plan/weigh.py``); without one, the search's plan or its balanced variant, whichever
    leaves the largest rank fewer bytes (a plan file's plan is taken as it is)."""
    drop_no_op_conversions(captured.gm)
    fold_repeat_kv_into_sdpa(captured.gm)
    split_fused_projections(captured.gm)

    names, inputs = captured.state_names(), set(captured.user_inputs())
    blocks = {name: fmt.block for name, fmt in captured.packed.items()}

    def search(keep_whole: dict[str, str], balanced: bool = False) -> tuple[ShardingPlan, Propagation]:
        return choose_plan(
            captured.gm,
            tp,
            names,
            inputs,
            plan_file,
            sharded_outputs=captured.lm is not None,
            moe=moe,
            blocks=blocks,
            float_fix=captured.float_fix,
            keep_whole=keep_whole,
            balanced=balanced,
        )

    if tp == 1 or (profile is None and plan_file is not None):
        plan, prop = search({})
    elif profile is None:
        from tpcompile.cost.extract import workload

        plan, prop = balance_by_bytes(search, lambda p: workload(captured, p).largest_rank_bytes())
    else:
        from tpcompile.cost.extract import workload
        from tpcompile.cost.model import predict

        def speed(p: Propagation) -> float:
            predicted = predict(workload(captured, p, comm_dtype), profile, WEIGH_PROMPT, WEIGH_NEW_TOKENS)
            return predicted.decode_tokens_per_s if predicted.fits else 0.0

        plan, prop = weigh_plans(search, speed, profile.name)
    if prop.refusals:
        raise UnsupportedModelError(prop.refusals[0])
    return plan, prop


def compile_model(
    captured: CapturedModel,
    tp: int,
    out: Path,
    plan_file: PlanFile | None = None,
    force: bool = False,
    progress: Progress | None = None,
    moe: str = DEFAULT_MOE,
    format: str = FORMAT_TORCH,
    native: bool = False,
    comm_dtype: str = "fp32",
    profile: HardwareProfile | None = None,
) -> CompileResult:
    """Compile ``captured`` for ``tp`` ranks into ``out``; ``comm_dtype`` (bf16 | fp16; fp32: off) is the
    dtype wider all-reduce payloads are cast to around each all-reduce (``--comm-dtype``); ``profile``:
    weigh the exact plans on this hardware profile and keep the fastest (``--profile``)."""
    if tp < 1:
        raise UsageError(f"--tp must be at least 1 (got {tp})")
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    comm = comm_dtype_of(comm_dtype, format)
    _refuse_functional_state(captured)
    if format == FORMAT_ONNX and captured.packed:
        raise UsageError(
            f"--format onnx cannot run quantized weights yet ({len(captured.packed)} tensors of "
            f"{captured.source} are stored quantized); add --dequantize"
        )
    say = progress or (lambda _msg: None)
    say("planning")
    plan, prop = plan_model(captured, tp, plan_file, moe, profile, comm)
    stored = rank_tensors(captured, prop)
    examples, dynamic = input_signature(captured.program, captured.user_inputs())
    with atomic_directory(out, force) as tmp:
        packed = packed_weights(captured, {name: prop.roots[n] for n, name in captured.state_names().items()})
        ranks = write_ranks(captured, prop, stored, examples, dynamic, tmp, say, packed, comm)
        section = None
        if native and format == FORMAT_TORCH:
            quant = packed.section(stored, {}) if packed.formats else None
            section = compile_native(tmp, tp, captured.zero_state, examples, dynamic, say, quant)
            for entry in ranks:
                package = tmp / entry.dir / section.files[entry.rank]
                entry.files[package.name] = sha256_file(package)
        manifest = build_manifest(captured, plan, prop, ranks, moe, comm)
        describe_packed(manifest, packed, stored, captured)
        manifest.warnings.extend(captured.warnings)
        if section is not None:
            manifest.extra["native"] = section.to_json()
        if captured.lm is not None:
            say("writing tokenizer")
            describe_language_model(manifest, captured.lm, tmp)
        if format == FORMAT_ONNX:  # rank programs -> ONNX segments cut at the collectives (tpcompile.onnx)
            from tpcompile.onnx.artifact import to_onnx

            to_onnx(tmp, manifest, say)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return CompileResult(manifest, out, plan, prop)


def comm_dtype_of(name: str, format: str) -> torch.dtype | None:
    """The dtype of ``--comm-dtype name`` (None for fp32: payloads cross as they are)."""
    if name not in DTYPES:
        raise UsageError(f"--comm-dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    if name != "fp32" and format == FORMAT_ONNX:
        raise UsageError(f"--format onnx cannot run --comm-dtype {name} yet; drop --comm-dtype")
    return None if name == "fp32" else DTYPES[name]


def _refuse_functional_state(captured: CapturedModel) -> None:
    """Buffer writes must stay in place (a KV cache written by ``index_copy_``): a program whose writes
    were functionalized returns its new buffers instead, which the runtime has no place for."""
    kinds = (spec.kind for spec in captured.program.graph_signature.output_specs)
    if OutputKind.BUFFER_MUTATION in kinds:
        raise UsageError(
            "programs with functionalized buffer mutations are not supported; export without "
            "run_decompositions() so that buffer writes stay in place"
        )


def rank_tensors(captured: CapturedModel, prop: Propagation) -> list[list[StoredTensor]]:
    """Every stored tensor of every rank, with its local shape (rank r's list at index r)."""
    names = captured.state_names()
    parameters = {
        s.arg.name for s in captured.program.graph_signature.input_specs if s.kind == InputKind.PARAMETER
    }
    return [
        [
            StoredTensor(
                name,
                local_shape(tuple(node.meta["val"].shape), prop.roots[node], rank),
                node.meta["val"].dtype,
                node.name in parameters,
            )
            for node, name in names.items()
        ]
        for rank in range(prop.tp)
    ]


def write_ranks(
    captured: CapturedModel,
    prop: Propagation,
    stored: list[list[StoredTensor]],
    examples: list[torch.Tensor],
    dynamic: Any,
    tmp: Path,
    say: Progress,
    packed: PackedWeights,
    comm_dtype: torch.dtype | None = None,
) -> list[RankEntry]:
    """Write every rank's weight shard while forked workers capture the rank programs; hash both."""
    names = captured.state_names()
    roots = {names[n]: prop.roots[n] for n in names}
    ranks: list[RankEntry] = []
    for rank in range(prop.tp):
        (tmp / f"rank{rank}").mkdir()
    job = RankProgramJob(captured.gm, prop, names, stored, examples, dynamic, tmp, comm_dtype)
    with rank_program_pool(job, prop.tp) as programs:
        for rank, tensors in enumerate(stored):

            def read_local(name: str, r: int = rank) -> torch.Tensor:
                if name in packed.keys:
                    return packed.read(packed.keys[name], r)
                return _read_local(captured, name, roots[name], r)

            written = [
                packed.spec(t.name, t.shape) if t.name in packed.formats else (t.name, t.dtype, t.shape)
                for t in tensors
                if t.name not in captured.zero_state
            ]
            nbytes = write_safetensors(tmp / f"rank{rank}" / WEIGHTS_FILE, written, read_local)
            say(f"rank {rank}: weights written")
            ranks.append(RankEntry(rank, f"rank{rank}", nbytes, {}))
        for rank in programs:
            say(f"rank {rank}: program captured")
    for entry in ranks:
        entry.files = {f: sha256_file(tmp / entry.dir / f) for f in (PROGRAM_FILE, WEIGHTS_FILE)}
    return ranks


def _read_local(captured: CapturedModel, name: str, pl: RootPlacement, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a stored tensor, reading only that slice when the source allows."""
    if isinstance(pl, Pieces) and captured.read_slice is not None:
        parts = [_read_local_part(captured, name, pl.dim, lo, hi, part, rank) for lo, hi, part in pl.parts]
        return torch.cat(parts, pl.dim)
    if isinstance(pl, Shard) and captured.read_slice is not None:
        return captured.read_slice(name, pl.dim, pl.offset(rank), pl.sizes[rank])
    return local_tensor(captured.read_tensor(name), pl, rank)


def _read_local_part(
    captured: CapturedModel, name: str, dim: int, lo: int, hi: int, part: Placement, rank: int
) -> torch.Tensor:
    """Rank ``rank``'s slice of the piece ``[lo, hi)`` of a stored tensor (see ``Pieces``)."""
    assert captured.read_slice is not None
    if isinstance(part, Shard):
        return captured.read_slice(name, dim, lo + part.offset(rank), part.sizes[rank])
    return local_tensor(captured.read_slice(name, dim, lo, hi - lo), part, rank)
