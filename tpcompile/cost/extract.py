"""The workload (``cost/workload.py``) of a planned program, read off its propagation.

Invariant: every number comes from the planned graph and the stored tensors' placements: a rank's bytes
are its local shapes (``passes/slicing.local_shape``), a collective's bytes per token its value's size
with every symbolic (sequence) dim at 1 (in the ``--comm-dtype`` an all-reduce is cast to); a stored
tensor read only by lookups (an untied embedding) is not streamed by a step, and a KV cache
(``zero_state``) counts per cached position.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from tpcompile.cost.workload import Collective, RankWork, Workload
from tpcompile.frontend.capture import CapturedModel
from tpcompile.passes.collectives import wire_dtype
from tpcompile.passes.rule_api import Propagation
from tpcompile.passes.slicing import local_shape

aten = torch.ops.aten
_LOOKUPS = {aten.embedding.default, aten.index_select.default, aten.index.Tensor}
#: The runtime's distributed argmax of a greedy step: (max, index) of every rank, gathered.
ARGMAX_BYTES = 16


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bytes_per_token(node: fx.Node, cast_to: torch.dtype | None = None) -> int:
    """Bytes a collective of ``node``'s value sends per token; a payload the program casts to ``cast_to``
    (``passes/collectives.wire_dtype``: an all-reduce under ``--comm-dtype``) counts in that dtype."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    numel = 1
    for s in val.shape:
        numel *= 1 if isinstance(s, torch.SymInt) else int(s)
    wire = wire_dtype(val.dtype, cast_to)
    return numel * (wire.itemsize if wire is not None else val.element_size())


def _lookup_only(node: fx.Node) -> bool:
    return bool(node.users) and all(u.op == "call_function" and u.target in _LOOKUPS for u in node.users)


def workload(captured: CapturedModel, prop: Propagation, comm_dtype: torch.dtype | None = None) -> Workload:
    """The workload of ``captured`` planned as ``prop`` (see the module invariant), its all-reduces cast to
    ``comm_dtype`` (``--comm-dtype``; None: as they are)."""
    names = captured.state_names()
    max_seq = captured.lm.max_seq_len if captured.lm is not None else 0
    collectives: Counter[tuple[Collective, int]] = Counter()
    for red, _ in prop.collectives():
        op = Collective(red.collective)
        cast_to = comm_dtype if op is Collective.ALL_REDUCE else None  # only all-reduces are cast
        collectives[(op, _bytes_per_token(red.producer, cast_to))] += 1
    if captured.lm is not None and prop.tp > 1:
        collectives[(Collective.ALL_GATHER, ARGMAX_BYTES)] += 1
    ops = sum(1 for n in captured.gm.graph.nodes if n.op == "call_function") + 2 * sum(collectives.values())
    ranks = []
    for rank in range(prop.tp):
        weight = streamed = flops = kv = 0
        for node, name in names.items():
            val = node.meta["val"]
            numel = _numel(local_shape(tuple(val.shape), prop.roots[node], rank))
            nbytes = numel * val.element_size()
            if name in captured.zero_state:
                kv += nbytes // max_seq if max_seq else 0
                continue
            weight += nbytes
            if not _lookup_only(node):
                streamed += nbytes
                flops += 2 * numel if val.dim() >= 2 else 0
        ranks.append(RankWork(weight, streamed, float(flops), kv, ops))
    return Workload(prop.tp, tuple(ranks), collectives, max_seq)
