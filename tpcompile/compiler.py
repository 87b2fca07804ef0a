"""The compile pipeline: capture -> plan + placement propagation -> per-rank lowering -> artifact.

``compile_model`` is the one entry point used by the CLI and by tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export.graph_signature import OutputKind

import tpcompile
from tpcompile.artifact.program import StoredTensor, input_signature
from tpcompile.artifact.rank_programs import RankProgramJob, rank_program_pool
from tpcompile.artifact.safetensors_writer import write_safetensors
from tpcompile.artifact.writer import atomic_directory, sha256_file
from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.capture import CapturedModel, LanguageModelInfo
from tpcompile.passes.canonicalize import drop_no_op_conversions, fold_repeat_kv_into_sdpa
from tpcompile.passes.collectives import GROUP_NAME
from tpcompile.passes.fused import split_fused_projections
from tpcompile.passes.lower_rank import tensor_bytes
from tpcompile.passes.placement import Partial, Pieces, Placement, Replicate, RootPlacement, Shard
from tpcompile.passes.propagate import Propagation, piece_key
from tpcompile.passes.slicing import local_shape, local_tensor
from tpcompile.plan.auto import choose_plan, find_sites
from tpcompile.plan.experts import DEFAULT_MOE, describe_experts
from tpcompile.plan.spec import PlanFile, ShardingPlan
from tpcompile.runtime.format import CollectiveEntry, Manifest, ParameterEntry, RankEntry, TensorSpec

Progress = Callable[[str], None]


@dataclass
class CompileResult:
    manifest: Manifest
    out: Path
    plan: ShardingPlan
    propagation: Propagation


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(name: str, val: Any, placement: str = "R") -> TensorSpec:
    shape: list[int | str] = [int(s) if isinstance(s, int) else str(s) for s in val.shape]
    return TensorSpec(name, _dtype_name(val.dtype), shape, placement)


def _output_name(captured: CapturedModel, i: int, n: int) -> str:
    if captured.lm is not None and n == 1:
        return "logits"
    return "output" if n == 1 else f"output{i}"


def _output_placement(prop: Propagation, out: fx.Node) -> Placement:
    """What the program returns for ``out``: its placement, unless a redistribution feeds the output."""
    output = next(n for n in out.graph.nodes if n.op == "output")
    red = prop.redistributions.get((output, out))
    if red is not None:
        return red.dst
    pl = prop.placements[out]
    return pl if isinstance(pl, Replicate | Partial | Shard) else Replicate()


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _pieces_label(pl: Pieces, name: str, plan: ShardingPlan) -> str:
    """``fused-colwise`` for a fused projection whose pieces are column-parallel (see ``Pieces``)."""
    kinds = set()
    for lo, hi, part in pl.parts:
        decision = plan.decisions.get(piece_key(name, (pl.dim, lo, hi)))
        kinds.add(_plan_label(part, decision.style if decision else None))
    kinds.discard("replicate")
    return f"fused-{kinds.pop()}" if len(kinds) == 1 else "fused" if kinds else "replicate"


def _plan_label(pl: Placement, decision: str | None, out_dim: int = 0) -> str:
    """``out_dim``: the weight's output-feature dim (1 for ``x @ W`` products such as GPT-2's Conv1D)."""
    if isinstance(pl, Partial):
        return "partial"
    if isinstance(pl, Shard):
        if decision in ("colwise", "vocab", "expert"):
            return decision
        return "colwise" if pl.dim == out_dim else "rowwise"
    return "replicate"


def _mutated_buffers(captured: CapturedModel) -> dict[int, str]:
    return {
        i: str(spec.target)
        for i, spec in enumerate(captured.program.graph_signature.output_specs)
        if spec.kind == OutputKind.BUFFER_MUTATION
    }


def plan_model(
    captured: CapturedModel, tp: int, plan_file: PlanFile | None = None, moe: str = DEFAULT_MOE
) -> tuple[ShardingPlan, Propagation]:
    """Choose the plan and propagate placements (no files written)."""
    drop_no_op_conversions(captured.gm)
    fold_repeat_kv_into_sdpa(captured.gm)
    split_fused_projections(captured.gm)
    plan, prop = choose_plan(
        captured.gm,
        tp,
        captured.state_names(),
        set(captured.user_inputs()),
        plan_file,
        sharded_outputs=captured.lm is not None,
        moe=moe,
    )
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
    format: str = "torch",
) -> CompileResult:
    if tp < 1:
        raise UsageError(f"--tp must be at least 1 (got {tp})")
    if format not in ("torch", "onnx"):
        raise UsageError(f"--format must be torch or onnx (got {format!r})")
    say = progress or (lambda _msg: None)
    gm = captured.gm
    names = captured.state_names()
    user_inputs = captured.user_inputs()
    if _mutated_buffers(captured):
        raise UsageError(
            "programs with functionalized buffer mutations are not supported; export without "
            "run_decompositions() so that buffer writes stay in place"
        )
    say("planning")
    plan, prop = plan_model(captured, tp, plan_file, moe)
    stored_nodes = list(names)
    kinds = {s.arg.name: s.kind.name for s in captured.program.graph_signature.input_specs}
    examples, dynamic = input_signature(captured.program, user_inputs)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [a for a in torch.utils._pytree.tree_leaves(output_node.args) if isinstance(a, fx.Node)]

    by_name = {names[n]: n for n in stored_nodes}
    stored = {
        rank: [
            StoredTensor(
                names[n],
                local_shape(tuple(n.meta["val"].shape), prop.roots[n], rank),
                n.meta["val"].dtype,
                kinds[n.name] == "PARAMETER",
            )
            for n in stored_nodes
        ]
        for rank in range(tp)
    }
    with atomic_directory(out, force) as tmp:
        for rank in range(tp):
            (tmp / f"rank{rank}").mkdir()
        job = RankProgramJob(gm, prop, names, stored, examples, dynamic, tmp)
        with rank_program_pool(job, tp) as programs:
            ranks: list[RankEntry] = []
            for rank in range(tp):
                rdir = tmp / f"rank{rank}"

                def read_local(name: str, r: int = rank) -> torch.Tensor:
                    return _read_local(captured, name, prop.roots[by_name[name]], r)

                nbytes = write_safetensors(
                    rdir / "weights.safetensors",
                    [(t.name, t.dtype, t.shape) for t in stored[rank] if t.name not in captured.zero_state],
                    read_local,
                )
                say(f"rank {rank}: weights written")
                ranks.append(RankEntry(rank, f"rank{rank}", nbytes, {}))
            for rank in programs:
                say(f"rank {rank}: program captured")
        for entry in ranks:
            rdir = tmp / entry.dir
            entry.files = {f: sha256_file(rdir / f) for f in ("program.pt2", "weights.safetensors")}
        manifest = _manifest(captured, tp, prop, plan, names, user_inputs, outputs, ranks)
        experts = describe_experts(names, prop.roots, gm, moe)  # mixture of experts: mode, layouts
        if experts is not None:
            manifest.extra["moe"] = experts
        if captured.lm is not None:
            say("writing tokenizer")
            describe_language_model(manifest, captured.lm, tmp)
        if format == "onnx":  # rank programs -> ONNX segments cut at the collectives (tpcompile.onnx)
            from tpcompile.onnx.artifact import to_onnx

            to_onnx(tmp, manifest, say)
        (tmp / "manifest.json").write_text(manifest.to_json())
    return CompileResult(manifest, out, plan, prop)


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


def describe_language_model(manifest: Manifest, lm: LanguageModelInfo, out: Path) -> None:
    """Record what generation needs (``extra.lm``) and write the tokenizer beside the ranks."""
    tokenizer_dir = out / "tokenizer"
    has_tokenizer = lm.save_tokenizer(tokenizer_dir)
    chat_template = False
    if has_tokenizer:
        for path in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file()):
            manifest.shared_files[path.relative_to(out).as_posix()] = sha256_file(path)
            if path.name.startswith("chat_template") or (
                path.name == "tokenizer_config.json" and '"chat_template"' in path.read_text()
            ):
                chat_template = True
    manifest.kind = "causal_lm"
    manifest.extra["lm"] = {
        "vocab_size": lm.vocab_size,
        "max_seq_len": lm.max_seq_len,
        "max_batch_size": lm.max_batch_size,
        "eos_token_ids": lm.eos_token_ids,
        "bos_token_id": lm.bos_token_id,
        "pad_token_id": lm.pad_token_id,
        "tokenizer": "tokenizer" if has_tokenizer else None,
        "chat_template": chat_template,
        "generation": lm.generation,
        "model_type": lm.model_type,
    }


def collective_entries(prop: Propagation) -> list[CollectiveEntry]:
    """The manifest's ``collectives``: one entry per collective in every rank's program."""
    return [
        CollectiveEntry(
            op=str(red.collective),
            producer=red.producer.name,
            consumers=[c.name for c in consumers],
            src=str(red.src),
            dst=str(red.dst),
            bytes_per_call=tensor_bytes(red.producer),
            scope=_scope(red.producer),
        )
        for red, consumers in prop.collectives()
    ]


def _manifest(
    captured: CapturedModel,
    tp: int,
    prop: Propagation,
    plan: ShardingPlan,
    names: dict[fx.Node, str],
    user_inputs: list[fx.Node],
    outputs: list[fx.Node],
    ranks: list[RankEntry],
) -> Manifest:
    sites = find_sites(captured.gm, names)
    vocab_weights = {names[s.weight] for s in sites if "embedding" in str(s.node.target)}
    out_dims = {names[s.weight]: 0 if "linear" in str(s.node.target) else 1 for s in sites}
    params = []
    total = 0
    for node, name in names.items():
        val = node.meta["val"]
        pl = prop.roots[node]
        decision = plan.decisions.get(name)
        label = (
            "vocab"
            if name in vocab_weights and isinstance(pl, Shard) and pl.dim == 0
            else (decision.style if decision else None)
        )
        params.append(
            ParameterEntry(
                name,
                [int(s) for s in val.shape],
                _dtype_name(val.dtype),
                str(pl),
                _pieces_label(pl, name, plan)
                if isinstance(pl, Pieces)
                else _plan_label(pl, label, out_dims.get(name, 0)),
            )
        )
        if name not in captured.zero_state:  # KV caches are not weights: the runtime allocates them
            total += val.numel() * val.element_size()
    collectives = collective_entries(prop)
    dtypes = {n.meta["val"].dtype for n in names if n.meta["val"].is_floating_point()}
    return Manifest(
        tp=tp,
        kind="generic",
        dtype=_dtype_name(dtypes.pop()) if len(dtypes) == 1 else "mixed",
        group_name=GROUP_NAME,
        inputs=[_spec(n.name, n.meta["val"]) for n in user_inputs],
        outputs=[
            _spec(_output_name(captured, i, len(outputs)), o.meta["val"], str(_output_placement(prop, o)))
            for i, o in enumerate(outputs)
        ],
        zero_state=sorted(captured.zero_state),
        parameters=sorted(params, key=lambda p: p.name),
        collectives=collectives,
        ranks=ranks,
        total_weight_bytes=total,
        tool={"name": "tpcompile", "version": tpcompile.__version__},
        torch_version=torch.__version__,
        source=Path(captured.source).name if Path(captured.source).exists() else captured.source,
        warnings=list(prop.warnings),
    )
