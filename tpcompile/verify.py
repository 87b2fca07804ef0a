"""``tpcompile verify``: run an artifact on real processes and compare with the original model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from tpcompile.artifact.program import input_signature
from tpcompile.errors import UsageError
from tpcompile.explain import read_manifest
from tpcompile.frontend import CapturedModel, load_model


@dataclass
class VerifyReport:
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    comm_dtype: str | None = None  # the artifact's all-reduce payload dtype when it casts them (--comm-dtype)

    def text(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        comm = f" with all-reduce payloads in {self.comm_dtype} (--comm-dtype)" if self.comm_dtype else ""
        return (
            f"{verdict}: max abs error {self.max_abs:.3e} (atol {self.atol:g}), "
            f"max rel error {self.max_rel:.3e} (rtol {self.rtol:g}){comm}"
        )


def _id_bound(captured: CapturedModel, node: fx.Node) -> int | None:
    """The smallest embedding table an integer input indexes, if any: random ids must stay below it."""
    bounds = []
    for user in node.users:
        weight = user.args[0]
        if "embedding" in str(user.target) and user.args[1] is node and isinstance(weight, fx.Node):
            bounds.append(int(weight.meta["val"].shape[0]))
    return min(bounds) if bounds else None


def random_inputs(captured: CapturedModel, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    nodes = captured.user_inputs()
    examples, _ = input_signature(captured.program, nodes)
    out = []
    for node, ex in zip(nodes, examples, strict=True):
        if ex.dtype.is_floating_point:
            out.append(torch.randn(ex.shape, generator=gen, dtype=ex.dtype))
        elif ex.dtype == torch.bool:
            out.append(torch.randint(0, 2, ex.shape, generator=gen).bool())
        else:
            high = _id_bound(captured, node) or 2
            out.append(torch.randint(0, high, ex.shape, generator=gen, dtype=ex.dtype))
    return out


def verify(
    artifact: Path,
    reference: str,
    inputs_path: Path | None,
    atol: float,
    rtol: float,
    seed: int,
    trust_pickle: bool,
) -> VerifyReport:
    from tpcompile.runtime import run_artifact

    manifest = read_manifest(artifact)
    captured = load_model(reference, trust_pickle=trust_pickle)
    names = [n.name for n in captured.user_inputs()]
    if names != [i.name for i in manifest.inputs]:
        raise UsageError(
            f"the reference takes inputs {names}, the artifact {[i.name for i in manifest.inputs]}"
        )
    if inputs_path is not None:
        from safetensors.torch import load_file

        given = load_file(str(inputs_path))
        missing = [n for n in names if n not in given]
        if missing:
            raise UsageError(f"{inputs_path} lacks inputs {missing}")
        inputs = [given[n] for n in names]
    else:
        inputs = random_inputs(captured, seed)
    with torch.no_grad():
        expected = list(torch.utils._pytree.tree_leaves(captured.program.module()(*inputs)))
    got = run_artifact(artifact, dict(zip(names, inputs, strict=True)))
    max_abs = max_rel = 0.0
    ok = True
    for ref, name in zip(expected, [o.name for o in manifest.outputs], strict=True):
        out = got[name]
        diff = (out.double() - ref.double()).abs()
        max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
        rel = diff / ref.double().abs().clamp_min(1e-12)
        max_rel = max(max_rel, float(rel.max()) if rel.numel() else 0.0)
        ok = ok and bool(torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol))
    comm = manifest.comm_dtype if manifest.casts_all_reduces else None
    return VerifyReport(max_abs, max_rel, atol, rtol, ok, comm)
