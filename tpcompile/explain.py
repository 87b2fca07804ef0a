"""``tpcompile explain``: a readable table of an artifact's plan, collectives and memory per rank, and with
``--profile`` the cost model's predicted decode step on that hardware, layer by layer."""

from __future__ import annotations

import re
from pathlib import Path

from tpcompile.errors import UsageError
from tpcompile.runtime.format import Manifest
from tpcompile.runtime.format.hardware import HardwareProfile
from tpcompile.runtime.format.placement import Pieces, Shard
from tpcompile.runtime.format.quant_section import quant_section

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)|(?:^|\.)h\.(\d+)(?:\.|$)|(?:^|\.)blocks\.(\d+)(?:\.|$)")


def read_manifest(artifact: Path) -> Manifest:
    path = artifact / "manifest.json"
    if not path.is_file():
        raise UsageError(f"no manifest.json in {artifact}: not a tpcompile artifact")
    try:
        return Manifest.read(path)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f"{path} is not a valid manifest: {err}") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def explain(artifact: Path, profile: HardwareProfile | None = None, prompt_len: int = 512) -> str:
    m = read_manifest(artifact)
    lines = [f"artifact {artifact}  tp={m.tp}  dtype={m.dtype}  source={m.source}", "", "parameters:"]
    quant = quant_section(m.extra, str(artifact / "manifest.json"))
    packed = quant.tensors if quant is not None else {}
    width = max((len(p.name) for p in m.parameters), default=10)
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'stored':<10} {'plan':<10} placement")
    for p in m.parameters:
        q = packed.get(p.name)
        stored = f"{q.format.value}/{q.format.block}" if q is not None else p.dtype
        lines.append(f"  {p.name:<{width}}  {str(p.shape):<16} {stored:<10} {p.plan:<10} {p.placement}")
    if quant is not None:  # weights kept in their quantized block format (runtime/format/quant_section.py)
        formats = sorted({t.format.value for t in packed.values()})
        packed_bytes = [sum(t.bytes[r] for t in packed.values()) for r in range(m.tp)]
        lines += [
            "",
            f"quantized weights: {len(packed)} stored packed ({', '.join(formats) or 'none'}), "
            f"per rank {', '.join(_mib(b) for b in packed_bytes)}; row-parallel cuts on block boundaries",
        ]
        if quant.dequantized:
            lines.append(f"  stored dequantized ({len(quant.dequantized)}, no kernel for their format):")
            lines += [f"    {name}: {kind}" for name, kind in quant.dequantized.items()]
    unsplit = m.extra.get("unsplit") or {}
    if unsplit:  # weights a plan site could have split that the plan keeps whole (plan/auto.py)
        lines += ["", "left replicated (a split was considered):"]
        lines += [f"  {name}: {reason}" for name, reason in unsplit.items()]
    lines += plans_weighed(m)
    lines += ["", "collectives (forward pass):"]
    lines.append(f"  {'op':<11} {'scope':<24} {'value':<20} {'needed by':<24} bytes/call")
    for c in m.collectives:
        cast = f" (as {c.comm_dtype}; {c.bytes_per_call} uncast)" if c.comm_dtype is not None else ""
        lines.append(
            f"  {c.op:<11} {c.scope or '(top)':<24} {c.producer:<20} {','.join(c.consumers):<24} "
            f"{c.wire_bytes}{cast}"
        )
    lines += comm_dtype_summary(m)
    moe = m.extra.get("moe")
    if moe:  # mixture of experts: the mode and what it communicates (see tpcompile/plan/experts.py)
        lines += ["", f"mixture of experts (--moe {moe['mode']}): {moe['communication']}"]
        for name, w in moe["weights"].items():
            per_rank = f"  experts per rank {w['experts_per_rank']}" if "experts_per_rank" in w else ""
            lines.append(f"  {name}: {w['experts']} experts, {w['placement']}{per_rank}")
    lines += ["", "memory per rank (weights):"]
    for r in m.ranks:
        share = r.weight_bytes / m.total_weight_bytes if m.total_weight_bytes else 0.0
        lines.append(f"  rank {r.rank}: {_mib(r.weight_bytes)} ({share:.0%} of {_mib(m.total_weight_bytes)})")
    if profile is not None:
        lines += ["", *predicted_breakdown(m, profile, prompt_len)]
    return "\n".join(lines)


def plans_weighed(m: Manifest) -> list[str]:
    """The candidate plans ``compile --profile`` weighed (plan/weigh.py), the chosen one marked ``*``."""
    weighed = m.extra.get("plans_weighed")
    if not weighed:
        return []
    lines = [
        "",
        f"plans weighed on {weighed['profile']} (the cost model's decode prediction; * = this artifact):",
    ]
    for c in weighed["candidates"]:
        what = "keeps whole " + "; ".join(c["kept_whole"]) if c["kept_whole"] else "every chain split"
        if c.get("balanced"):
            what += ", heads balanced across KV groups"
        mark = "*" if c["chosen"] else " "
        lines.append(
            f"  {mark} {c['decode_tokens_per_s']:8.1f} tokens/s  {c['collectives']:4d} collectives  {what}"
        )
    return lines


def comm_dtype_summary(m: Manifest) -> list[str]:
    """The all-reduce payload dtype (``--comm-dtype``) and the bytes the cast saves, per forward pass at the
    example sizes and per decode step (batch 1, from the cost section's bytes per token)."""
    if not m.casts_all_reduces:
        return [f"  all-reduce payloads cross as {m.comm_dtype or m.dtype} (no --comm-dtype cast)"]
    reduces = [c for c in m.collectives if c.op == "all_reduce"]
    sent = sum(c.wire_bytes for c in m.collectives)
    uncast = sum(c.bytes_per_call for c in m.collectives)
    lines = [
        f"  all-reduce payloads cross as {m.comm_dtype} (--comm-dtype): the collectives send {sent} bytes "
        f"per forward pass at the example sizes instead of {uncast} ({uncast - sent} saved)"
    ]
    section = m.extra.get("cost")
    if section:
        from tpcompile.cost.workload import Collective, Workload

        w = Workload.from_json(section)  # its all-reduce bytes are the cast (wire) bytes
        wire = sum(n * b for (op, b), n in w.collectives.items() if op == Collective.ALL_REDUCE)
        ratio = sum(c.bytes_per_call for c in reduces) / max(1, sum(c.wire_bytes for c in reduces))
        uncast = round(wire * ratio)
        lines.append(
            f"  per decode step (batch 1): all-reduces send {wire} bytes instead of {uncast} "
            f"({uncast - wire} saved)"
        )
    return lines


def _layer(name: str) -> str:
    """The decoder layer a parameter or collective scope belongs to (for display), else "other"."""
    found = _LAYER.search(name)
    if found is None:
        return "other"
    return f"layer {next(g for g in found.groups() if g is not None)}"


def _local_bytes(shape: list[int], placement: object, rank: int, itemsize: int) -> int:
    numel = 1
    for i, size in enumerate(shape):
        if isinstance(placement, Shard) and i == placement.dim:
            size = placement.sizes[rank]
        elif isinstance(placement, Pieces) and i == placement.dim:
            size = sum(placement.local_size(k, rank) for k in range(len(placement.parts)))
        numel *= size
    return numel * itemsize


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4}


def predicted_breakdown(m: Manifest, profile: HardwareProfile, prompt_len: int) -> list[str]:
    """The cost model's decode step of ``m`` on ``profile``: the total, then per layer the slowest rank's
    weight-streaming time and its share of the step's collectives (the runtime's argmax gather is one more,
    outside any layer)."""
    from tpcompile.cost.model import predict
    from tpcompile.cost.workload import Workload

    section = m.extra.get("cost")
    kind = "PREDICTED from data-sheet numbers" if profile.predicted else "measured on this host"
    head = f"predicted decode step on {profile.name} [{kind}]:"
    if not section:
        return [head, "  (this artifact predates the cost section of the manifest: recompile it)"]
    w = Workload.from_json(section)
    pred = predict(w, profile, prompt_len, 128)
    step = pred.decode
    lines = [
        head,
        f"  {pred.decode_tokens_per_s:.1f} tokens/s at position {prompt_len + 64}: slowest rank "
        f"{step.slowest_rank}: weights {step.weights_s * 1e3:.3f} ms, compute {step.compute_s * 1e3:.3f} ms, "
        f"host {step.host_s * 1e3:.3f} ms; collectives {step.comm_s * 1e3:.3f} ms "
        f"({pred.comm_share:.0%} of the step)",
        f"  {'layer':<10} {'weights ms (slowest rank)':>26} {'collectives':>12} {'comm ms':>9}",
    ]
    on_node = profile.ranks_on_node(m.tp)
    bandwidth = profile.bandwidth_per_rank(on_node)
    per_layer: dict[str, list[float]] = {}
    zero = set(m.zero_state)
    for p in m.parameters:
        if p.name in zero:
            continue
        item = _ITEMSIZE.get(p.dtype, 4)
        worst = max(_local_bytes(p.shape, p.placement, r, item) for r in range(m.tp))
        per_layer.setdefault(_layer(p.name), [0.0, 0, 0.0])[0] += worst / bandwidth
    mean_comm = step.comm_s / w.collective_count() if w.collective_count() else 0.0
    for c in m.collectives:  # a layer's share of the step's collectives (they carry the same row size)
        row = per_layer.setdefault(_layer(c.scope), [0.0, 0, 0.0])
        row[1] += 1
        row[2] += mean_comm
    for name in sorted(per_layer, key=_layer_order):
        weights, count, comm = per_layer[name]
        lines.append(f"  {name:<10} {weights * 1e3:>26.3f} {int(count):>12} {comm * 1e3:>9.3f}")
    return lines


def _layer_order(name: str) -> tuple[int, int]:
    return (0, int(name.split()[1])) if name.startswith("layer ") else (1, 0)
