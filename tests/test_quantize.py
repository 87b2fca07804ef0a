"""Quantize on compile (issue 16, ``--quantize int8|int4``): float weights stored packed, run on the
quantized-weight kernels.

- the quantizer + the Python dequantization against the C++ kernels, bit for bit, for every new format;
- a tiny random HF Llama (hidden 384 = 3 groups of 128, MLP 640 = 5 groups of 128: uneven at tp=2 and 3)
  compiled in-process with int8 / int4 g32 / g64 / g128 at tp=1..3: logits within 1e-4 of transformers
  running the model whose weights were replaced by their quantize-dequantized values (computed here by a
  plain torch implementation of the formulas, not by ``tpcompile.frontend.quantize``); the manifest names
  each kept tensor's format and block; row-parallel cuts fall on group boundaries; the weights shrink;
- ``--quantize-embeddings`` quantizes the (tied) embedding table too; a GGUF source already quantized is
  refused;
- CLI errors (one line, nothing written): ``--group-size 48``, ``--group-size`` with int8, fewer groups
  than ranks at the requested tp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tpcompile
from tests.test_quant import check_kernels
from tpcompile.frontend.quantize import QuantizeOptions, quantize_model, quantize_rows
from tpcompile.runtime.format.quant_section import COMPILE_FORMATS, QuantFormat

pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 384, 6, 3, 640, 256
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- the formulas, written independently of tpcompile.frontend.quantize -----------------------------------


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``w`` quantized and dequantized by the formulas of ``--quantize`` (fp32)."""
    w = w.to(torch.float32)
    if fmt is QuantFormat.INT8:
        d = (w.abs().amax(dim=1, keepdim=True) / 127).half().float()
        q = torch.round(w / torch.where(d == 0, 1.0, d)).clamp(-127, 127)
        return torch.where(d == 0, 0.0, d * q)
    g = fmt.block
    groups = w.reshape(w.shape[0], -1, g)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    d, m = ((hi - lo) / 15).half().float(), lo.half().float()
    q = torch.round((groups - m) / torch.where(d == 0, 1.0, d)).clamp(0, 15)
    q = torch.where(d == 0, 0.0, q)
    return (d * q + m).reshape(w.shape)


@pytest.mark.parametrize("fmt", COMPILE_FORMATS)
def test_quantizer_python_and_cpp_dequantize_agree(fmt: QuantFormat) -> None:
    cols = 3 * 128
    w = torch.randn(70, cols) * 0.3
    w[5] = 0.0  # a zero row: scale 0, q 0
    w[6, :128] = 0.25  # constant groups: d 0, w = m
    packed = quantize_rows(w, fmt)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (70, fmt.packed_cols(cols))
    check_kernels(packed, fmt, fake_quantize(w, fmt), torch.tensor([[0, 69, 5], [6, 3, 3]]))
    # rows quantize independently: a row slice is the same bytes
    assert torch.equal(quantize_rows(w[10:30], fmt), packed[10:30])


def test_int8_is_q8_0_blocks_with_the_row_scale() -> None:
    w = torch.randn(4, 96)
    packed = quantize_rows(w, QuantFormat.INT8).reshape(4, 3, 34)
    assert torch.equal(packed[:, 0, :2], packed[:, 1, :2]) and torch.equal(packed[:, 0, :2], packed[:, 2, :2])
    d = packed[:, 0, :2].contiguous().view(torch.float16).float().reshape(4)
    assert torch.equal(d, (w.abs().amax(1) / 127).half().float())
    assert QuantFormat.INT8.block_bytes == 34 and QuantFormat.INT4_G128.block_bytes == 4 + 64


# -- a tiny HF Llama --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A random tied-embedding Llama checkpoint and transformers' model of it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.checkpoints import random_checkpoint

    config = AutoConfig.for_model(
        "llama",
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = random_checkpoint(config, tmp_path_factory.mktemp("tiny-llama") / "ckpt", std=0.05)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return path, model.eval()


def _compile_tiny(source: Path, tp: int, out: Path, opts: QuantizeOptions | None) -> dict[str, Any]:
    from tpcompile.compiler import compile_model
    from tpcompile.frontend.hf import load_hf

    captured = load_hf(source, max_seq_len=32)
    assert captured.lm is not None
    captured.lm.save_tokenizer = lambda _out: False
    if opts is not None:
        quantize_model(captured, opts)
    compile_model(captured, tp, out, native=False)
    return json.loads((out / "manifest.json").read_text())


def _logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    from tpcompile.runtime import run_artifact

    return run_artifact(out, {"input_ids": ids, "cache_position": torch.arange(ids.shape[1])})["logits"]


def _reference_logits(model: Any, fmt: QuantFormat, ids: torch.Tensor, embeddings: bool) -> torch.Tensor:
    import copy

    fake = copy.deepcopy(model)
    with torch.no_grad():
        for layer in fake.model.layers:
            for name in LINEARS:
                linear = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                weight = getattr(linear, name).weight
                weight.copy_(fake_quantize(weight, fmt))
        if embeddings:  # tied: the lm_head is the same tensor
            table = fake.model.embed_tokens.weight
            table.copy_(fake_quantize(table, fmt))
        return fake(ids).logits


IDS = torch.tensor([[1, 5, 9, 33, 2, 255, 17, 4, 8, 11, 40]])
CASES = [  # each format at some tp; tp=1..3 for both kinds; uneven group splits at tp=3 (g32) and tp=2 (g128)
    (QuantFormat.INT8, 1),
    (QuantFormat.INT8, 2),
    (QuantFormat.INT8, 3),
    (QuantFormat.INT4_G32, 1),
    (QuantFormat.INT4_G32, 3),
    (QuantFormat.INT4_G128, 2),
]


@pytest.fixture(scope="module")
def artifacts(
    tiny_llama: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[QuantFormat | None, int], tuple[Path, dict[str, Any]]]:
    """(format or None for fp32, tp) -> the compiled artifact and its manifest, compiled on first use."""
    root = tmp_path_factory.mktemp("quantized")

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[QuantFormat | None, int]) -> tuple[Path, dict[str, Any]]:
            fmt, tp = key
            out = root / f"{fmt.value if fmt else 'fp32'}-tp{tp}"
            self[key] = (out, _compile_tiny(tiny_llama[0], tp, out, QuantizeOptions(fmt) if fmt else None))
            return self[key]

    return Lazy()


@pytest.mark.parametrize(("fmt", "tp"), CASES, ids=[f"{f.value}-tp{tp}" for f, tp in CASES])
def test_quantized_logits_equal_the_fake_quantized_model(
    fmt: QuantFormat, tp: int, tiny_llama: tuple[Path, Any], artifacts: dict[Any, Any]
) -> None:
    _, model = tiny_llama
    out, manifest = artifacts[fmt, tp]
    quant = manifest["extra"]["quant"]
    kept = {name.split("layers.0.")[-1] for name in quant["tensors"] if ".layers.0." in name}
    assert kept == {f"{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight" for n in LINEARS}
    assert len(quant["tensors"]) == 2 * len(LINEARS)  # the tied table stays float by default
    for name, t in quant["tensors"].items():
        assert (t["format"], t["block"], t["block_bytes"]) == (fmt.value, fmt.block, fmt.block_bytes), name
        assert len(t["bytes"]) == tp
    assert quant["dequantized"] == {}
    placements = {p["name"]: p["placement"] for p in manifest["parameters"]}
    if tp > 1:  # row-parallel cuts on group boundaries (uneven where the groups do not divide by tp)
        for weight, width in (("mlp.down_proj.weight", FFN), ("self_attn.o_proj.weight", HIDDEN)):
            pl = next(p for n, p in placements.items() if n.endswith(f"layers.0.{weight}"))
            sizes = [int(s) for s in pl.split(";")[1].rstrip(")").split(",")]
            assert pl.startswith("S(1;") and sum(sizes) == width and all(s % fmt.block == 0 for s in sizes)
            if weight.startswith("mlp"):
                groups = FFN // fmt.block
                assert sorted(sizes, reverse=True) == [
                    (groups // tp + (r < groups % tp)) * fmt.block for r in range(tp)
                ]
    torch.testing.assert_close(
        _logits(out, IDS), _reference_logits(model, fmt, IDS, False), atol=1e-4, rtol=1e-4
    )


def test_weights_shrink(artifacts: dict[Any, Any]) -> None:
    """At tp=2 the linear weights take <= 0.3x their fp32 bytes with int8 (34 bytes per 32 weights) and
    <= 0.15x with int4 g128 (68 bytes per 128), and the largest rank shrinks with them (its float table and
    norms are the same in both)."""
    largest = {}
    for fmt, bound in ((QuantFormat.INT8, 0.3), (QuantFormat.INT4_G128, 0.15)):
        manifest = artifacts[fmt, 2][1]
        shapes = {p["name"]: p["shape"] for p in manifest["parameters"]}
        tensors = manifest["extra"]["quant"]["tensors"]
        packed = sum(sum(t["bytes"]) for t in tensors.values())
        floats = sum(4 * shapes[name][0] * shapes[name][1] for name in tensors)
        assert packed <= bound * floats, (fmt, packed, floats)
        largest[fmt] = max(r["weight_bytes"] for r in manifest["ranks"])
        assert largest[fmt] < 0.6 * (floats + sum(r["weight_bytes"] for r in manifest["ranks"]) - packed) / 2
    assert largest[QuantFormat.INT4_G128] < largest[QuantFormat.INT8]


def test_quantize_embeddings_quantizes_the_tied_table(tiny_llama: tuple[Path, Any], tmp_path: Path) -> None:
    path, model = tiny_llama
    fmt = QuantFormat.INT4_G64  # (the one int4 size the other compiles leave out)
    manifest = _compile_tiny(path, 2, tmp_path / "art", QuantizeOptions(fmt, embeddings=True))
    tensors = manifest["extra"]["quant"]["tensors"]
    table = next(t for name, t in tensors.items() if name.endswith("embed_tokens.weight"))
    assert table["format"] == fmt.value and len(tensors) == 2 * len(LINEARS) + 1
    torch.testing.assert_close(
        _logits(tmp_path / "art", IDS), _reference_logits(model, fmt, IDS, True), atol=1e-4, rtol=1e-4
    )


def test_a_quantized_gguf_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from tests.test_quant import LAYOUTS, write_tiny_llama
    from tpcompile.errors import UsageError
    from tpcompile.frontend.hf import load_hf

    path = tmp_path / "q.gguf"
    write_tiny_llama(path, LAYOUTS["q"])
    captured = load_hf(path, max_seq_len=32)
    with pytest.raises(UsageError, match=r"already quantized .*--quantize applies to float checkpoints"):
        quantize_model(captured, QuantizeOptions(QuantFormat.INT8))
    requantized = load_hf(path, max_seq_len=32, dequantize=True)  # --dequantize --quantize: allowed
    quantize_model(requantized, QuantizeOptions(QuantFormat.INT8))
    assert requantized.packed and set(requantized.packed.values()) == {QuantFormat.INT8}


# -- CLI errors: one line, exit 2, nothing written ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128 (got 48)"),
        (
            ["--quantize", "int8", "--group-size", "32"],
            "--group-size applies to --quantize int4 only (int8 has one scale per row)",
        ),
        (["--group-size", "64"], "--group-size applies only with --quantize"),
        (
            ["--quantize", "int8", "--format", "onnx"],
            "--format onnx cannot run quantized weights yet; drop --quantize",
        ),
    ],
    ids=["group-48", "int8-group", "no-quantize", "onnx"],
)
def test_bad_quantize_options_are_one_line(
    args: list[str], message: str, tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    path, _ = tiny_llama
    out = tmp_path / "out"
    proc = tpcompile(path, "--tp", "2", "-o", out, "--quiet", "--no-native", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"tpcompile: error: {message}"]
    assert not out.exists()


def test_fewer_groups_than_ranks_is_refused(tiny_llama: tuple[Path, Any], tmp_path: Path) -> None:
    """o_proj's 384 inputs are 3 groups of 128: 4 ranks cannot share them."""
    path, _ = tiny_llama
    out = tmp_path / "out"
    proc = tpcompile(
        path, "--tp", "4", "-o", out, "--quiet", "--no-native", "--quantize", "int4", "--group-size", "128"
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tpcompile: error: --tp 4 cannot split ")
    assert (
        "quantization blocks (128 input features each)" in lines[0] and "a smaller --group-size" in lines[0]
    )
    assert not out.exists()
