"""``tpcompile verify``: run an artifact on real processes and compare with the original model.

Inputs: the user's ``--inputs``, else a prefill for a causal LM or random inputs for any other program
(``inputs.py``). Reference: the original model with the weights the artifact computes with
(``reference.py``: dequantized for quantized artifacts).

Invariant: the verdict is OK only when every output has the reference's shape, both sides are finite
everywhere, and ``allclose(artifact, reference, atol, rtol)`` holds; a NaN or inf on either side is a
MISMATCH that says so (it is never reported as an error of 0). ``atol`` defaults to ``DEFAULT_ATOL``, or
``LM_ATOL`` for a causal LM: its logits (of magnitude ~10) sum tens of layers, in another order on each side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tpcompile.errors import UsageError
from tpcompile.explain import read_manifest
from tpcompile.verify.inputs import VerifyInputs, lm_prefill, random_inputs
from tpcompile.verify.reference import load_reference, run_reference

__all__ = ["DEFAULT_ATOL", "LM_ATOL", "VerifyReport", "compare", "verify"]

DEFAULT_ATOL = 1e-5
LM_ATOL = 1e-4


@dataclass
class VerifyReport:
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool
    problem: str | None = None  # a mismatch the errors do not measure (NaN / inf, a shape)
    reference: str = ""
    inputs: str = ""
    comm_dtype: str | None = None  # the artifact's all-reduce payload dtype when it casts them (--comm-dtype)

    def text(self) -> str:
        """The verdict line, then what the reference and the inputs were."""
        comm = f" with all-reduce payloads in {self.comm_dtype} (--comm-dtype)" if self.comm_dtype else ""
        errors = (
            f"max abs error {self.max_abs:.3e} (atol {self.atol:g}), "
            f"max rel error {self.max_rel:.3e} (rtol {self.rtol:g}){comm}"
        )
        verdict = "OK" if self.ok else "MISMATCH"
        lines = [f"MISMATCH: {self.problem}" if self.problem else f"{verdict}: {errors}"]
        if self.reference:
            lines.append(f"reference: {self.reference}")
        if self.inputs:
            lines.append(f"inputs: {self.inputs}")
        return "\n".join(lines)


def _nonfinite(side: str, name: str, t: torch.Tensor) -> str | None:
    if not t.is_floating_point():
        return None
    bad = int((~torch.isfinite(t)).sum())
    if not bad:
        return None
    return f"{side}'s output '{name}' holds NaN or inf ({bad} of {t.numel()} values)"


def compare(
    expected: Sequence[torch.Tensor],
    got: Mapping[str, torch.Tensor],
    names: Sequence[str],
    atol: float,
    rtol: float,
) -> VerifyReport:
    """Compare the artifact's outputs ``got`` (by name) with the reference's ``expected`` (in the order of
    ``names``)."""
    max_abs = max_rel = 0.0
    ok = True
    problem = None
    for ref, name in zip(expected, names, strict=True):
        out = got[name]
        if tuple(out.shape) != tuple(ref.shape):
            problem = problem or (
                f"output '{name}' has shape {list(out.shape)}, the reference's {list(ref.shape)}"
            )
            continue
        problem = problem or _nonfinite("the artifact", name, out) or _nonfinite("the reference", name, ref)
        diff = (out.double() - ref.double()).abs()
        finite = diff[torch.isfinite(diff)]
        max_abs = max(max_abs, float(finite.max()) if finite.numel() else 0.0)
        rel = diff / ref.double().abs().clamp_min(1e-12)
        rel = rel[torch.isfinite(rel)]
        max_rel = max(max_rel, float(rel.max()) if rel.numel() else 0.0)
        ok = ok and bool(torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol))
    return VerifyReport(max_abs, max_rel, atol, rtol, ok and problem is None, problem)


def verify(
    artifact: Path,
    reference: str,
    inputs_path: Path | None,
    atol: float | None,
    rtol: float,
    seed: int,
    trust_pickle: bool,
) -> VerifyReport:
    from tpcompile.runtime import run_artifact

    manifest = read_manifest(artifact)
    ref = load_reference(reference, manifest, trust_pickle)
    names = [n.name for n in ref.captured.user_inputs()]
    if names != manifest.input_names:
        raise UsageError(f"the reference takes inputs {names}, the artifact {manifest.input_names}")
    if inputs_path is not None:
        from safetensors.torch import load_file

        given = load_file(str(inputs_path))
        missing = [n for n in names if n not in given]
        if missing:
            raise UsageError(f"{inputs_path} lacks inputs {missing}")
        inputs = VerifyInputs([given[n] for n in names], f"{inputs_path}")
    elif manifest.lm is not None:
        inputs = lm_prefill(manifest, manifest.lm, seed)
    else:
        inputs = random_inputs(ref.captured, seed)
    expected = run_reference(ref, inputs.tensors)
    got = run_artifact(artifact, dict(zip(names, inputs.tensors, strict=True)))
    if atol is None:
        atol = LM_ATOL if manifest.is_causal_lm else DEFAULT_ATOL
    report = compare(expected, got, manifest.output_names, atol, rtol)
    report.reference, report.inputs = ref.description, inputs.description
    report.comm_dtype = manifest.comm_dtype if manifest.casts_all_reduces else None
    return report
