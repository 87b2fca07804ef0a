"""What the manifest says about a compiled plan: parameters, collectives, outputs, the LM and MoE sections.

Invariant: every field is read off the plan and the propagation as they were decided (a parameter's
``plan`` label is the role its rule split it in, ``Propagation.style``), or off the captured program (each
symbolic input dim's range, ``symbols``, as ``torch.export`` recorded it); nothing here searches the graph
again or guesses from names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import tpcompile
from tpcompile.artifact.program import input_symbols
from tpcompile.cost.extract import workload
from tpcompile.frontend.capture import CapturedModel, LanguageModelInfo
from tpcompile.passes.collectives import GROUP_NAME, wire_dtype
from tpcompile.passes.lower_rank import tensor_bytes
from tpcompile.passes.rule_api import Propagation
from tpcompile.plan.experts import describe_experts
from tpcompile.plan.spec import ShardingPlan
from tpcompile.runtime.format import (
    CAUSAL_LM,
    GENERIC,
    CollectiveEntry,
    LMInfo,
    Manifest,
    ParameterEntry,
    RankEntry,
    SymbolRange,
    TensorSpec,
    sha256_file,
)
from tpcompile.runtime.format.placement import Partial, Placement, Replicate, Shard
from tpcompile.runtime.load.tensor_io import dtype_name

TOKENIZER_DIR = "tokenizer"


def _spec(name: str, val: Any, placement: Placement) -> TensorSpec:
    shape: list[int | str] = [int(s) if isinstance(s, int) else str(s) for s in val.shape]
    return TensorSpec(name, dtype_name(val.dtype), shape, placement)


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


def collective_entries(prop: Propagation, comm_dtype: torch.dtype | None = None) -> list[CollectiveEntry]:
    """The manifest's ``collectives``: one entry per collective in every rank's program (an all-reduce
    whose value the program casts to ``comm_dtype`` first, ``passes/collectives.py``, says so)."""
    entries = []
    for red, consumers in prop.collectives():
        val = red.producer.meta.get("val")
        nbytes = tensor_bytes(red.producer)
        wire, wire_bytes = None, None
        if red.collective == "all_reduce" and isinstance(val, torch.Tensor):
            wire = wire_dtype(val.dtype, comm_dtype)
            wire_bytes = None if wire is None else nbytes // val.element_size() * wire.itemsize
        entries.append(
            CollectiveEntry(
                op=str(red.collective),
                producer=red.producer.name,
                consumers=[c.name for c in consumers],
                src=str(red.src),
                dst=str(red.dst),
                bytes_per_call=nbytes,
                scope=_scope(red.producer),
                comm_dtype=None if wire is None else dtype_name(wire),
                wire_bytes_per_call=wire_bytes,
            )
        )
    return entries


def program_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    return [a for a in torch.utils._pytree.tree_leaves(output_node.args) if isinstance(a, fx.Node)]


def build_manifest(
    captured: CapturedModel,
    plan: ShardingPlan,
    prop: Propagation,
    ranks: list[RankEntry],
    moe: str,
    comm_dtype: torch.dtype | None = None,
) -> Manifest:
    """The manifest of a compiled artifact (without the LM section, see ``describe_language_model``);
    ``comm_dtype``: the ``--comm-dtype`` its programs were built with."""
    names = captured.state_names()
    params = []
    total = 0
    for node, name in names.items():
        val = node.meta["val"]
        entry = ParameterEntry(
            name, [int(s) for s in val.shape], dtype_name(val.dtype), prop.roots[node], str(prop.style(node))
        )
        params.append(entry)
        if name not in captured.zero_state:  # KV caches are not weights: the runtime allocates them
            total += val.numel() * val.element_size()
    outputs = program_outputs(captured.gm)
    dtypes = {n.meta["val"].dtype for n in names if n.meta["val"].is_floating_point()}
    dtype = dtype_name(dtypes.pop()) if len(dtypes) == 1 else "mixed"
    collectives = collective_entries(prop, comm_dtype)
    wire = {c.comm_dtype for c in collectives if c.comm_dtype is not None}
    manifest = Manifest(
        tp=prop.tp,
        kind=GENERIC,
        dtype=dtype,
        comm_dtype=wire.pop() if wire else dtype,
        group_name=GROUP_NAME,
        inputs=[_spec(n.name, n.meta["val"], Replicate()) for n in captured.user_inputs()],
        outputs=[
            _spec(_output_name(captured, i, len(outputs)), o.meta["val"], _output_placement(prop, o))
            for i, o in enumerate(outputs)
        ],
        zero_state=sorted(captured.zero_state),
        symbols={
            name: SymbolRange(low, high)
            for name, (low, high) in sorted(input_symbols(captured.program, captured.user_inputs()).items())
        },
        parameters=sorted(params, key=lambda p: p.name),
        collectives=collectives,
        ranks=ranks,
        total_weight_bytes=total,
        tool={"name": "tpcompile", "version": tpcompile.__version__},
        torch_version=torch.__version__,
        source=Path(captured.source).name if Path(captured.source).exists() else captured.source,
        warnings=list(prop.warnings),
    )
    if plan.unsplit:
        manifest.extra["unsplit"] = dict(sorted(plan.unsplit.items()))
    if plan.weighed:  # the exact plans weighed on a hardware profile (compile --profile, plan/weigh.py)
        manifest.extra["plans_weighed"] = {
            "profile": plan.weighed_on,
            "candidates": [w.to_json() for w in plan.weighed],
        }
    # what one step of each rank does, for the cost model (tpcompile explain --profile, tpcompile/cost/)
    manifest.extra["cost"] = workload(captured, prop, comm_dtype).to_json()
    experts = describe_experts(names, prop.roots, captured.gm, moe)  # mixture of experts: mode, layouts
    if experts is not None:
        manifest.extra["moe"] = experts
    return manifest


def describe_language_model(manifest: Manifest, lm: LanguageModelInfo, out: Path) -> None:
    """Record what generation needs (``extra.lm``) and write the tokenizer beside the ranks."""
    tokenizer_dir = out / TOKENIZER_DIR
    has_tokenizer = lm.save_tokenizer(tokenizer_dir)
    chat_template = False
    if has_tokenizer:
        for path in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file()):
            manifest.shared_files[path.relative_to(out).as_posix()] = sha256_file(path)
            if path.name.startswith("chat_template") or (
                path.name == "tokenizer_config.json" and '"chat_template"' in path.read_text()
            ):
                chat_template = True
    manifest.kind = CAUSAL_LM
    info = LMInfo(
        vocab_size=lm.vocab_size,
        max_seq_len=lm.max_seq_len,
        max_batch_size=lm.max_batch_size,
        eos_token_ids=tuple(lm.eos_token_ids),
        bos_token_id=lm.bos_token_id,
        pad_token_id=lm.pad_token_id,
        tokenizer=TOKENIZER_DIR if has_tokenizer else None,
        chat_template=chat_template,
        generation=lm.generation,
        model_type=lm.model_type,
        independent_rows=lm.independent_rows,
    )
    manifest.extra["lm"] = {**dataclasses.asdict(info), "eos_token_ids": list(info.eos_token_ids)}
