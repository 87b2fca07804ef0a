"""Quantized tensor parallelism (issue 16): GGUF Q8_0/Q4_0/Q4_1 weights stay packed from the file to the rank
shards to the kernels.

- the kernels (C++ and the Python reference) against ``gguf.quants.dequantize``;
- a tiny random Llama written as GGUF with every kept format (and a float tensor), compiled at tp=1..3 (an
  uneven block split of the MLP at tp=2 and 3), run on real ranks: logits within 1e-4 of transformers
  running the same file (which dequantizes it); row-parallel cuts fall on block boundaries;
- a tp at which the blocks do not go round is refused with one line, exit 2, nothing written;
- ``--dequantize`` stores floats again.
SmolLM2 itself (greedy tokens equal transformers at tp=1..4 on the kept-quantized artifact) runs in
``test_llm_e2e.py``, whose compiles now keep its Q4_1/Q8_0 tensors packed; the tp=2 size bound is here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tpcompile

gguf = pytest.importorskip("gguf")

from tpcompile.runtime.format.quant_section import QuantFormat  # noqa: E402
from tpcompile.runtime.kernels.quant import dequantize, load_quant_ops  # noqa: E402

GGML = {
    QuantFormat.Q8_0: gguf.GGMLQuantizationType.Q8_0,
    QuantFormat.Q4_0: gguf.GGMLQuantizationType.Q4_0,
    QuantFormat.Q4_1: gguf.GGMLQuantizationType.Q4_1,
}


def _quantized(fmt: QuantFormat, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed blocks, the reference dequantization) of a random [rows, cols] weight."""
    value = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = gguf.quants.quantize(value, GGML[fmt])
    reference = gguf.quants.dequantize(blocks, GGML[fmt]).astype(np.float32)
    return torch.from_numpy(blocks), torch.from_numpy(reference)


@pytest.mark.parametrize("fmt", list(QuantFormat))
def test_kernels_equal_the_reference_dequantization(fmt: QuantFormat) -> None:
    assert load_quant_ops(), "the C++ quantized kernels did not build"
    packed, reference = _quantized(fmt, 96, 160)
    assert torch.equal(dequantize(packed, fmt, 160), reference)  # the Python kernels' weights
    assert torch.equal(torch.ops.tpcompile.quant_dequantize(packed, fmt.code, 160), reference)
    ids = torch.tensor([[0, 95, 7], [7, 3, 3]])
    assert torch.equal(torch.ops.tpcompile.quant_embedding(packed, ids, fmt.code, 160), reference[ids])
    bias = torch.randn(96)
    for rows in (1, 3, 8, 9, 40):  # decode kernel (<= 8 rows) and the decoded-tile prefill path
        x = torch.randn(2, rows, 160)
        got = torch.ops.tpcompile.quant_linear(x, packed, bias, fmt.code, 160)
        want = F.linear(x, reference, bias)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.ops.tpcompile.quant_linear(x, packed, None, fmt.code, 160), F.linear(x, reference)
        )


# -- a tiny Llama as GGUF ---------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 96, 3, 1, 160, 64, 2  # FFN: 5 blocks of 32 (uneven at tp=2, 3)
LAYER_TYPES = {  # one of each kept format on a row-parallel weight, and a float weight among them
    "attn_q": QuantFormat.Q4_0,
    "attn_k": QuantFormat.Q4_1,
    "attn_v": None,  # F16
    "attn_output": QuantFormat.Q8_0,
    "ffn_gate": QuantFormat.Q4_0,
    "ffn_up": QuantFormat.Q8_0,
    "ffn_down": QuantFormat.Q4_1,
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def write_tiny_llama(path: Path, hidden: int = HIDDEN, heads: int = HEADS, ffn: int = FFN) -> None:
    """A tied-embedding Llama (Q8_0 embedding, which is also the lm_head) in the formats of LAYER_TYPES."""
    head_dim = hidden // heads
    gen = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny quantized llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)

    def add(name: str, shape: tuple[int, ...], fmt: QuantFormat | None, scale: float = 0.3) -> None:
        value = (gen.standard_normal(shape) * scale).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, 1.0 + value)
        elif fmt is None:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, GGML[fmt]), raw_dtype=GGML[fmt])

    add("token_embd.weight", (VOCAB, hidden), QuantFormat.Q8_0, 1.0)
    add("output_norm.weight", (hidden,), None)
    shapes = {
        "attn_q": (hidden, hidden),
        "attn_k": (KV_HEADS * head_dim, hidden),
        "attn_v": (KV_HEADS * head_dim, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (hidden,), None)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), None)
        for kind, fmt in LAYER_TYPES.items():
            add(f"blk.{i}.{kind}.weight", shapes[kind], fmt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def tiny_reference(tiny_gguf: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()


def _compile_tiny(source: Path, tp: int, out: Path, dequantize: bool = False) -> dict[str, Any]:
    """Compile in this process (the tiny file has no tokenizer: the artifact gets none)."""
    from tpcompile.compiler import compile_model
    from tpcompile.frontend.hf import load_hf

    captured = load_hf(source, max_seq_len=32, dequantize=dequantize)
    assert captured.lm is not None
    captured.lm.save_tokenizer = lambda _out: False
    compile_model(captured, tp, out, native=False)
    return json.loads((out / "manifest.json").read_text())


def _logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from tpcompile.runtime import run_artifact

    return run_artifact(out, {"input_ids": ids, "cache_position": torch.arange(ids.shape[1])})["logits"]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tiny_gguf_logits_equal_the_dequantized_model(
    tp: int, tiny_gguf: Path, tiny_reference: Any, tmp_path: Path
) -> None:
    out = tmp_path / f"tp{tp}"
    manifest = _compile_tiny(tiny_gguf, tp, out)
    quant = manifest["extra"]["quant"]
    placements = {p["name"]: p["placement"] for p in manifest["parameters"]}
    kept = {name.split("layers.0.")[-1]: t["format"] for name, t in quant["tensors"].items() if ".0." in name}
    assert kept == {HF_NAMES[k]: f.value for k, f in LAYER_TYPES.items() if f is not None}  # all, as stored
    assert any(name.endswith("embed_tokens.weight") for name in quant["tensors"])
    assert quant["dequantized"] == {}
    for name, t in quant["tensors"].items():  # packed bytes = what the rank shards hold for them
        assert len(t["bytes"]) == tp and t["block"] == 32, name
    # row-parallel cuts fall on block boundaries: down_proj's 160 inputs are 5 blocks of 32
    down = next(pl for name, pl in placements.items() if name.endswith("layers.0.mlp.down_proj.weight"))
    if tp > 1:
        sizes = [int(s) for s in down.split(";")[1].rstrip(")").split(",")]
        assert down.startswith("S(1;") and sum(sizes) == FFN and all(s % 32 == 0 for s in sizes)
        assert len(set(sizes)) == (1 if 5 % tp == 0 else 2)  # tp=2: 96,64; tp=3: 64,64,32
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 4, 8, 11, 40]])
    got = _logits(out, ids)
    with torch.no_grad():
        want = tiny_reference(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dequantize_stores_floats(tiny_gguf: Path, tmp_path: Path) -> None:
    manifest = _compile_tiny(tiny_gguf, 2, tmp_path / "deq", dequantize=True)
    assert "quant" not in manifest["extra"]
    quantized = _compile_tiny(tiny_gguf, 2, tmp_path / "q")
    assert (
        max(r["weight_bytes"] for r in quantized["ranks"])
        < max(r["weight_bytes"] for r in manifest["ranks"]) / 2
    )


def test_blocks_that_do_not_go_round_are_refused(tmp_path: Path) -> None:
    """4 heads of 16: o_proj's 64 inputs are 2 blocks of 32, which 3 ranks cannot share."""
    path = tmp_path / "narrow.gguf"
    write_tiny_llama(path, hidden=64, heads=4, ffn=128)
    out = tmp_path / "out"
    proc = tpcompile(path, "--tp", "3", "-o", out, "--quiet", "--no-native")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines == [
        "tpcompile: error: --tp 3 cannot split hf.model.layers.0.self_attn.o_proj.weight on its quantization "
        "blocks (32 input features each): its whole units of 32 features split over at most 2 ranks; use "
        "--tp 2 or less, or --dequantize"
    ]
    assert not out.exists()


# -- SmolLM2 Q4_1 -------------------------------------------------------------------------------------------

PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 12 times 7?"]


@pytest.mark.slow
def test_smollm2_kept_quantized_greedy_equals_transformers(compiled_smollm2: Any, tmp_path: Path) -> None:
    """The Q4_1 file compiled without --dequantize at tp=2: its shards hold the file's blocks (the largest
    rank at most 0.6 x the file), and greedy answers to several prompts equal transformers running the same
    file (dequantized) token for token."""
    from transformers import AutoModelForCausalLM

    from tests.checkpoints import smollm2_gguf
    from tests.conftest import tprun

    out = compiled_smollm2(2)
    manifest = json.loads((out / "manifest.json").read_text())
    quant = manifest["extra"]["quant"]
    assert {t["format"] for t in quant["tensors"].values()} == {"q4_1", "q8_0"} and not quant["dequantized"]
    assert max(r["weight_bytes"] for r in manifest["ranks"]) <= 0.6 * smollm2_gguf().stat().st_size
    saved = tmp_path / "tokens.json"
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    ran = tprun(out, *args, "--max-new-tokens", "64", "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    results = json.loads(saved.read_text())
    assert len(results) == len(PROMPTS)
    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    for result in results:
        with torch.no_grad():
            ids = torch.tensor([result["prompt_ids"]])
            want = model.eval().generate(ids, max_new_tokens=64, do_sample=False, top_k=None, top_p=None)
        assert result["new_ids"] == [int(t) for t in want[0, ids.shape[1] :]]
