"""The reference side of ``tpcompile verify``: the original model, with the weights the artifact computes
with, run in this process on a fresh state.

- The reference is loaded with the artifact's LM settings (dtype, KV cache length, batch size from the
  manifest), so that its inputs and outputs are the artifact's.
- Its stored tensors are read from the source (``CapturedModel.read_tensor``: a Hugging Face checkpoint
  or GGUF file is captured without weight memory, so the program's own state holds no values); the
  buffers the runtime creates as zeros (KV caches) are fresh zeros on every run.
- Quantized artifacts compare against the dequantized original: a GGUF source is read dequantized to
  floats (the values its blocks hold); a weight ``--quantize`` packed is quantized and dequantized by the
  compiler's own quantizer and the runtime's dequantizer, as the manifest's ``extra.quant`` names it. The
  artifact then agrees with the reference to fp32 round-off.

Invariant: running the reference never mutates anything it was given; the program is called as a pure
function of (stored tensors, inputs) and only its user outputs are returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export.graph_signature import OutputKind

from tpcompile.errors import UsageError
from tpcompile.frontend import CapturedModel, load_model
from tpcompile.frontend.hf_model import DTYPES
from tpcompile.frontend.options import LanguageModelOptions
from tpcompile.frontend.quantize import quantize_rows
from tpcompile.runtime.errors import and_more
from tpcompile.runtime.format import Manifest
from tpcompile.runtime.format.quant_section import COMPILE_FORMATS, QuantFormat, quant_section
from tpcompile.runtime.kernels.quant import dequantize
from tpcompile.runtime.load.tensor_io import torch_dtype

__all__ = ["Reference", "load_reference", "run_reference"]


@dataclass
class Reference:
    """The captured original, the stored tensors it runs with (caches excluded), and what they are."""

    captured: CapturedModel
    state: dict[str, torch.Tensor]
    description: str


def _lm_options(manifest: Manifest) -> LanguageModelOptions | None:
    lm = manifest.lm
    if lm is None:
        return None
    floats = [s.dtype for s in manifest.outputs if s.dtype.startswith(("float", "bfloat"))]
    by_dtype = {t: name for name, t in DTYPES.items()}
    dtype = by_dtype.get(torch_dtype(floats[0]), "fp32") if floats else "fp32"
    return LanguageModelOptions(dtype, lm.max_seq_len, lm.max_batch_size, dequantize=True)


def fake_quantized(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``w`` packed by the compile's quantizer and decoded by the runtime's dequantizer (fp32 arithmetic)."""
    return dequantize(quantize_rows(w, fmt), fmt, int(w.shape[1])).to(w.dtype)


def load_reference(spec: str, manifest: Manifest, trust_pickle: bool) -> Reference:
    """The reference ``spec`` for the artifact of ``manifest``, with the weights it must be compared with.

    Raises:
        UsageError: the reference does not hold a tensor the artifact stores quantized.
    """
    captured = load_model(spec, trust_pickle=trust_pickle, lm=_lm_options(manifest))
    names = set(captured.state_names().values())
    state = {n: captured.read_tensor(n) for n in sorted(names - captured.zero_state)}
    quant = quant_section(manifest.extra, str(manifest.path / "manifest.json"))
    # a GGUF file is always read dequantized: its blocks' values, whether the artifact kept the blocks or not
    original = "the GGUF's weights dequantized" if Path(spec).suffix == ".gguf" else "the original weights"
    if quant is None:
        return Reference(captured, state, original)
    missing = sorted(set(quant.tensors) - names)
    if missing:
        raise UsageError(
            f"the reference {spec} has no tensor {missing[0]}{and_more(missing)} that the artifact stores "
            "quantized: a different model?"
        )
    compiled: list[str] = []
    for name, t in sorted(quant.tensors.items()):
        if t.format in COMPILE_FORMATS:
            state[name] = fake_quantized(state[name], t.format)
            compiled += [t.format.value] if t.format.value not in compiled else []
    kept = {t.format.value for t in quant.tensors.values() if t.format not in COMPILE_FORMATS}
    kept |= set(quant.dequantized.values())
    parts = [f"dequantized {', '.join(compiled)} weights"] if compiled else []
    if kept:
        parts.append(f"dequantized {', '.join(sorted(kept))} weights of the GGUF")
    return Reference(captured, state, "; ".join(parts) or original)


def run_reference(reference: Reference, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The reference's user outputs (flattened) on ``inputs``, from fresh zero caches."""
    captured = reference.captured
    names = captured.state_names()
    fresh: Mapping[str, torch.Tensor] = {
        n: torch.zeros(tuple(node.meta["val"].shape), dtype=node.meta["val"].dtype)
        for node, n in names.items()
        if n in captured.zero_state
    }
    given = iter(inputs)
    args = []
    for node in captured.gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = names.get(node)
        args.append(next(given) if name is None else fresh.get(name, reference.state.get(name)))
    with torch.no_grad():
        flat = torch.utils._pytree.tree_leaves(captured.gm(*args))
    specs = captured.program.graph_signature.output_specs
    return [out for out, spec in zip(flat, specs, strict=True) if spec.kind == OutputKind.USER_OUTPUT]
