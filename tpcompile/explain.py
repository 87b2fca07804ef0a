"""``tpcompile explain``: a readable table of an artifact's plan, collectives and memory per rank."""

from __future__ import annotations

from pathlib import Path

from tpcompile.errors import UsageError
from tpcompile.runtime.format import Manifest
from tpcompile.runtime.format.quant_section import quant_section


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


def explain(artifact: Path) -> str:
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
    lines += ["", "collectives (forward pass):"]
    lines.append(f"  {'op':<11} {'scope':<24} {'value':<20} {'needed by':<24} bytes/call")
    for c in m.collectives:
        lines.append(
            f"  {c.op:<11} {c.scope or '(top)':<24} {c.producer:<20} {','.join(c.consumers):<24} "
            f"{c.bytes_per_call}"
        )
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
    return "\n".join(lines)
