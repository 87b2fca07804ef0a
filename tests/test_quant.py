"""Quantized tensor parallelism (issue 16): GGUF Q8_0/Q4_0/Q4_1 weights stay packed from the file to the rank
shards to the kernels.

- the kernels (C++ and the Python reference) against ``gguf.quants.dequantize``;
- a tiny random Llama written as GGUF with every kept format (and a float tensor), compiled at tp=1..3 (an
  uneven block split of the MLP at tp=2 and 3), run on real ranks: logits within 1e-4 of transformers
  running the same file (which dequantizes it); row-parallel cuts fall on block boundaries;
- a tp at which the blocks do not go round is refused with one line, exit 2, nothing written;
- ``--dequantize`` stores floats again;
- a GGML type without a kernel (Q5_0) is stored as floats with one warning line, and one the installed gguf
  cannot read (Q8_1) is refused with one line, exit 3, nothing written.
SmolLM2 itself (greedy tokens equal transformers at tp=1..4 on the kept-quantized artifact) runs in
``test_llm_e2e.py``, whose compiles now keep its Q4_1/Q8_0 tensors packed; the tp=2 size bound is here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, tpcompile
from tests.processes import assert_same_bits_as_avx2_build, compares_with_avx2_build

gguf = pytest.importorskip("gguf")

from tpcompile.runtime.format.quant_section import GGUF_FORMATS, PACKED_SUFFIX, QuantFormat  # noqa: E402
from tpcompile.runtime.kernels.quant import (  # noqa: E402
    deinterleave_rows,
    dequantize,
    interleave_rows,
    interleaves,
    load_quant_ops,
    op_code,
)

GGML = {f: gguf.GGMLQuantizationType[f.name] for f in GGUF_FORMATS}
K_QUANTS = (QuantFormat.Q4_K, QuantFormat.Q5_K, QuantFormat.Q6_K)


def quantize(value: np.ndarray, fmt: QuantFormat, seed: int = 0) -> np.ndarray:
    """GGUF blocks of ``fmt`` for ``value`` ([rows, cols]). gguf cannot quantize k-quants: those get random
    blocks (random quants and sub-block scales, small positive fp16 scales) of the same shape."""
    if fmt not in K_QUANTS:
        return gguf.quants.quantize(value, GGML[fmt])
    rows, cols = value.shape
    gen = np.random.default_rng(seed)
    nb = cols // fmt.block
    blocks = gen.integers(0, 256, (rows, nb, fmt.block_bytes), dtype=np.uint8)

    def scales() -> np.ndarray:
        return (
            (gen.random((rows, nb)) * 0.0001 + 0.00002).astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
        )

    if fmt is QuantFormat.Q6_K:
        blocks[..., 208:210] = scales()
    else:
        blocks[..., 0:2], blocks[..., 2:4] = scales(), scales()
    return blocks.reshape(rows, nb * fmt.block_bytes)


def _quantized(fmt: QuantFormat, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed blocks, the reference dequantization) of a random [rows, cols] weight."""
    value = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(value, fmt, seed)
    reference = gguf.quants.dequantize(blocks, GGML[fmt]).astype(np.float32)
    return torch.from_numpy(blocks), torch.from_numpy(reference)


def check_kernels(
    packed: torch.Tensor,
    fmt: QuantFormat,
    reference: torch.Tensor,
    ids: torch.Tensor,
    interleaved: bool = False,
) -> None:
    """Every kernel of ``fmt`` on ``packed`` (its rows interleaved first with ``interleaved``) against
    ``reference`` (its dequantized weight): the Python and C++ dequantizers and the embedding lookup of
    ``ids`` bit for bit; the linear (with and without a bias) to fp32 round-off, on the decode path (<= 8
    rows) and the decoded-tile prefill path; on the decode path each activation row gets the same bits alone
    as in a batch."""
    assert load_quant_ops(), "the C++ quantized kernels did not build"
    n, cols = reference.shape
    assert torch.equal(dequantize(packed, fmt, cols), reference)  # the Python kernels' weights
    code = op_code(fmt, interleaved)
    if interleaved:
        packed = interleave_rows(packed, fmt)
        assert torch.equal(dequantize(deinterleave_rows(packed, fmt), fmt, cols), reference)
    assert torch.equal(torch.ops.tpcompile.quant_dequantize(packed, code, cols), reference)
    assert torch.equal(torch.ops.tpcompile.quant_embedding(packed, ids, code, cols), reference[ids])
    bias = torch.randn(n)
    for rows in (1, 3, 8, 9, 40):
        x = torch.randn(2, rows, cols)
        got = torch.ops.tpcompile.quant_linear(x, packed, bias, code, cols)
        want = F.linear(x, reference, bias)
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, atol=2e-6 * scale, rtol=1e-5)
        got = torch.ops.tpcompile.quant_linear(x, packed, None, code, cols)
        torch.testing.assert_close(got, F.linear(x, reference), atol=2e-6 * scale, rtol=1e-5)
    batch = torch.randn(8, cols)
    alone = torch.cat(
        [torch.ops.tpcompile.quant_linear(row[None], packed, bias, code, cols) for row in batch]
    )
    assert torch.equal(torch.ops.tpcompile.quant_linear(batch, packed, bias, code, cols), alone)


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_kernels_equal_the_reference_dequantization(fmt: QuantFormat) -> None:
    packed, reference = _quantized(fmt, 96, 5 * fmt.block)
    check_kernels(packed, fmt, reference, torch.tensor([[0, 95, 7], [7, 3, 3]]))


INTERLEAVED_FORMATS = tuple(f for f in GGUF_FORMATS if interleaves(f))


# 45 rows: 5 groups of 8 (2 of 16 for nibbles), then 5 (13) rows as they are; 1024 inputs: AVX-512 builds
# permute a block's inputs rather than read them 8 times over (quant_ops.cpp, kRepeatedInputs)
@pytest.mark.parametrize(("rows", "cols"), [(96, 160), (45, 160), (45, 1024)])
@pytest.mark.parametrize("fmt", INTERLEAVED_FORMATS)
def test_interleaved_kernels_equal_the_reference_dequantization(
    fmt: QuantFormat, rows: int, cols: int
) -> None:
    packed, reference = _quantized(fmt, rows, cols)
    check_kernels(packed, fmt, reference, torch.tensor([[0, rows - 1, 7], [40, 3, 3]]), interleaved=True)


def python_kernels_read_interleaved_rows() -> None:
    """Run where the C++ kernels are off: the ops' Python kernels on interleaved rows (the interleaved op
    code) give the dequantized model's values bit for bit."""
    assert not load_quant_ops()
    for fmt in INTERLEAVED_FORMATS:
        packed, reference = _quantized(fmt, 45, 160)
        rows, code = interleave_rows(packed, fmt), op_code(fmt, interleaved=True)
        x, ids = torch.randn(3, 160), torch.tensor([0, 44, 9])
        assert torch.equal(torch.ops.tpcompile.quant_linear(x, rows, None, code, 160), F.linear(x, reference))
        assert torch.equal(torch.ops.tpcompile.quant_embedding(rows, ids, code, 160), reference[ids])
        assert torch.equal(torch.ops.tpcompile.quant_dequantize(rows, code, 160), reference)


def test_python_kernels_read_interleaved_rows() -> None:
    script = "from tests.test_quant import python_kernels_read_interleaved_rows as check; check()"
    env = dict(os.environ, TPCOMPILE_CPU_KERNELS="0")
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True, timeout=300)


@pytest.mark.parametrize("fmt", INTERLEAVED_FORMATS)
def test_interleaved_rows_are_laid_out_by_groups(fmt: QuantFormat) -> None:
    """Each group (8 rows; 16 for nibbles) keeps its bytes, block by block: the rows' f16 d, their f16 m
    (Q4_1), then 8 bytes for each weight j of the block: weight j of the 8 rows (Q8_0), or weight j of the
    group's row l in byte l's low nibble and of row l + 8 in its high one; the rows after the last group are
    unchanged."""
    rows, blocks, size = 37, 3, fmt.block_bytes
    packed = torch.randint(
        0, 256, (rows, blocks * size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    header = 4 if fmt is QuantFormat.Q4_1 else 2
    nibbles = fmt is not QuantFormat.Q8_0
    group_size = 16 if nibbles else 8

    def weight(row: int, block: int, j: int) -> int:
        """Weight j of a block as the file holds it: byte j, or nibbles (byte i: weights i and i + 16)."""
        quants = packed[row, block * size + header : (block + 1) * size]
        return int(quants[j % 16]) >> (4 * (j // 16)) & 15 if nibbles else int(quants[j])

    want = packed.clone()
    for group in range(rows // group_size):
        first = group_size * group
        out = want[first : first + group_size].view(-1)
        for b in range(blocks):
            at = b * group_size * size
            for field in range(0, header, 2):  # d, then m
                for r in range(group_size):
                    start = at + group_size * field + 2 * r
                    out[start : start + 2] = packed[first + r, b * size + field :][:2]
            for j in range(32):
                for lane in range(8):
                    byte = weight(first + lane, b, j)
                    if nibbles:
                        byte |= weight(first + lane + 8, b, j) << 4
                    out[at + group_size * header + 8 * j + lane] = byte
    got = interleave_rows(packed, fmt)
    assert torch.equal(got, want)
    assert torch.equal(deinterleave_rows(got, fmt), packed)


def quant_kernel_outputs() -> list[torch.Tensor]:
    """Decode products (1 and 3 activation rows, with a bias) of every kept format on fixed seeded blocks,
    as this process's kernels give them (int4_g128: random nibbles, small fp16 d and m), and of the formats
    with an interleaved layout with their rows interleaved (3 and 32 blocks a row)."""
    assert load_quant_ops()
    gen = torch.Generator().manual_seed(0)
    cases = [(fmt, *_quantized(fmt, 37, 3 * fmt.block)[:1]) for fmt in GGUF_FORMATS]
    g128 = torch.randint(0, 256, (37, 2, 68), dtype=torch.uint8, generator=gen)
    g128[..., 0:4] = torch.tensor([0.01, -0.05]).half().view(torch.uint8)
    cases.append((QuantFormat.INT4_G128, g128.reshape(37, -1)))
    codes = [fmt.code for fmt, _ in cases]
    for fmt in INTERLEAVED_FORMATS:
        for cols in (3 * fmt.block, 32 * fmt.block):
            cases.append((fmt, interleave_rows(_quantized(fmt, 37, cols)[0], fmt)))
            codes.append(op_code(fmt, interleaved=True))
    outputs = []
    for (fmt, packed), code in zip(cases, codes, strict=True):
        cols = packed.shape[1] // fmt.block_bytes * fmt.block
        bias = torch.randn(37, generator=gen)
        for rows in (1, 3):
            x = torch.randn(rows, cols, generator=gen)
            outputs.append(torch.ops.tpcompile.quant_linear(x, packed, bias, code, cols))
    return outputs


@compares_with_avx2_build
def test_quant_kernels_give_the_same_bits_when_built_for_avx2(tmp_path: Path, one_thread: None) -> None:
    """Every weight a kernel decodes is the reference's value and every sum has one order, on any ISA: the
    AVX-512 build's table lookup of nibble weights and the AVX2 build's widen-and-scale give the same bits."""
    assert_same_bits_as_avx2_build("tests.test_quant:quant_kernel_outputs", tmp_path)


# -- a tiny Llama as GGUF ---------------------------------------------------------------------------------

VOCAB, LAYERS = 64, 2


@dataclass(frozen=True)
class Layout:
    """A tiny tied-embedding Llama's sizes and the format of each weight (None: F16)."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    embedding: QuantFormat
    types: dict[str, QuantFormat | None]


LAYOUTS = {
    # one of each 32-block format, and a float weight; down_proj's 160 inputs are 5 blocks of 32 (uneven
    # at tp=2 and 3), o_proj's are 3 heads of 32 (one block each)
    "q": Layout(
        96, 3, 1, 160, QuantFormat.Q8_0,
        {
            "attn_q": QuantFormat.Q4_0, "attn_k": QuantFormat.Q4_1, "attn_v": None,
            "attn_output": QuantFormat.Q8_0, "ffn_gate": QuantFormat.Q4_0, "ffn_up": QuantFormat.Q8_0,
            "ffn_down": QuantFormat.Q4_1,
        },
    ),
    # k-quants (256-blocks): down_proj's 768 inputs are 3 blocks (tp=2: 2+1 blocks); the table is Q6_K
    "k": Layout(
        256, 4, 2, 768, QuantFormat.Q6_K,
        {
            "attn_q": QuantFormat.Q4_K, "attn_k": QuantFormat.Q5_K, "attn_v": QuantFormat.Q6_K,
            "attn_output": QuantFormat.Q8_0, "ffn_gate": QuantFormat.Q5_K, "ffn_up": QuantFormat.Q4_K,
            "ffn_down": QuantFormat.Q6_K,
        },
    ),
}  # fmt: skip
HF_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def write_tiny_llama(path: Path, layout: Layout, foreign: dict[str, str] | None = None) -> None:
    """The GGUF file of ``layout`` (random weights; no tokenizer). ``foreign`` stores some tensor kinds in a
    GGML type tpcompile has no kernel for instead, by name (``{"ffn_up": "Q5_0"}``); a type gguf cannot
    quantize (Q8_1) gets blocks of zeros of its size."""
    hidden, heads, kv_heads, ffn = layout.hidden, layout.heads, layout.kv_heads, layout.ffn
    head_dim = hidden // heads
    gen = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny quantized llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
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
            writer.add_tensor(name, quantize(value, fmt, seed=len(name) + shape[0]), raw_dtype=GGML[fmt])

    def add_foreign(name: str, shape: tuple[int, int], ggml: Any) -> None:
        value = (gen.standard_normal(shape) * 0.3).astype(np.float32)
        try:
            blocks = gguf.quants.quantize(value, ggml)
        except NotImplementedError:
            block, size = gguf.GGML_QUANT_SIZES[ggml]
            blocks = np.zeros((shape[0], shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(name, blocks, raw_dtype=ggml)

    add("token_embd.weight", (VOCAB, hidden), layout.embedding, 1.0)
    add("output_norm.weight", (hidden,), None)
    shapes = {
        "attn_q": (hidden, hidden),
        "attn_k": (kv_heads * head_dim, hidden),
        "attn_v": (kv_heads * head_dim, hidden),
        "attn_output": (hidden, hidden),
        "ffn_gate": (ffn, hidden),
        "ffn_up": (ffn, hidden),
        "ffn_down": (hidden, ffn),
    }
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (hidden,), None)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), None)
        for kind, fmt in layout.types.items():
            if foreign and kind in foreign:
                add_foreign(f"blk.{i}.{kind}.weight", shapes[kind], gguf.GGMLQuantizationType[foreign[kind]])
            else:
                add(f"blk.{i}.{kind}.weight", shapes[kind], fmt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """Each layout's file and transformers' model of it (which dequantizes it), made on first use."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[str, tuple[Path, Any]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: str) -> tuple[Path, Any]:
            path = root / f"tiny-{key}.gguf"
            write_tiny_llama(path, LAYOUTS[key])
            model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, dtype=torch.float32)
            self[key] = (path, model.eval())
            return self[key]

    return Lazy(made)


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


@pytest.mark.parametrize(("layout", "tp"), [("q", 1), ("q", 2), ("q", 3), ("k", 2), ("k", 3)])
def test_tiny_gguf_logits_equal_the_dequantized_model(
    layout: str, tp: int, tiny_ggufs: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    path, reference = tiny_ggufs[layout]
    spec = LAYOUTS[layout]
    out = tmp_path / f"tp{tp}"
    manifest = _compile_tiny(path, tp, out)
    quant = manifest["extra"]["quant"]
    placements = {p["name"]: p["placement"] for p in manifest["parameters"]}
    kept = {name.split("layers.0.")[-1]: t["format"] for name, t in quant["tensors"].items() if ".0." in name}
    assert kept == {HF_NAMES[k]: f.value for k, f in spec.types.items() if f is not None}  # all, as stored
    table = next(t for name, t in quant["tensors"].items() if name.endswith("embed_tokens.weight"))
    assert table["format"] == spec.embedding.value
    assert quant["dequantized"] == {}
    for name, t in quant["tensors"].items():  # packed bytes: one entry per rank
        assert len(t["bytes"]) == tp and t["block"] == QuantFormat(t["format"]).block, name
    # row-parallel cuts fall on block boundaries, unevenly where the blocks do not divide by tp
    block = spec.types["ffn_down"].block  # type: ignore[union-attr]
    down = next(pl for name, pl in placements.items() if name.endswith("layers.0.mlp.down_proj.weight"))
    if tp > 1:
        sizes = [int(s) for s in down.split(";")[1].rstrip(")").split(",")]
        assert down.startswith("S(1;") and sum(sizes) == spec.ffn and all(s % block == 0 for s in sizes)
        blocks = spec.ffn // block
        assert sorted(sizes, reverse=True) == [(blocks // tp + (r < blocks % tp)) * block for r in range(tp)]
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 4, 8, 11, 40]])
    got = _logits(out, ids)
    with torch.no_grad():
        want = reference(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dequantize_stores_floats(tiny_ggufs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    path, _ = tiny_ggufs["q"]
    manifest = _compile_tiny(path, 2, tmp_path / "deq", dequantize=True)
    assert "quant" not in manifest["extra"]
    quantized = _compile_tiny(path, 2, tmp_path / "q")
    assert (
        max(r["weight_bytes"] for r in quantized["ranks"])
        < max(r["weight_bytes"] for r in manifest["ranks"]) / 2
    )


def test_interleaved_weights_are_bound_from_huge_pages(
    tiny_ggufs: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    """A rank's interleaved quantized weights (the runtime's own copies of the shard's bytes) share one
    mapping advised for huge pages, and hold the shard's bytes."""
    from safetensors.torch import load_file

    from tests.test_huge_pages import mapping_of, thp_enabled
    from tpcompile.runtime import load_rank

    path, _ = tiny_ggufs["q"]
    out = tmp_path / "q"
    manifest = _compile_tiny(path, 1, out)
    formats = {name: QuantFormat(t["format"]) for name, t in manifest["extra"]["quant"]["tensors"].items()}
    shard = load_file(str(next((out / "rank0").glob("*.safetensors"))))
    program = load_rank(out, 0)
    bound = {name: t for name, t in program.module.named_buffers() if name.endswith("_packed_x8")}
    assert bound and len(bound) == sum(interleaves(f) for f in formats.values())
    for name, packed in bound.items():
        key = name.removesuffix("_packed_x8")
        assert torch.equal(deinterleave_rows(packed, formats[key]), shard[key + PACKED_SUFFIX]), name
    mappings = [mapping_of(t.data_ptr()) for t in bound.values()]
    assert len({m["range"] for m in mappings}) == 1
    assert mappings[0]["THPeligible"] == ("1" if thp_enabled() else "0")


def test_blocks_that_do_not_go_round_are_refused(tmp_path: Path) -> None:
    """4 heads of 16: o_proj's 64 inputs are 2 blocks of 32, which 3 ranks cannot share."""
    path = tmp_path / "narrow.gguf"
    write_tiny_llama(path, Layout(64, 4, 1, 128, QuantFormat.Q8_0, LAYOUTS["q"].types))
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


def test_a_type_without_a_kernel_is_stored_dequantized_with_one_warning(tmp_path: Path) -> None:
    """Q5_0, which gguf reads and tpcompile has no kernel for: those weights are stored as floats, one
    warning line names them and the bytes they add, and the logits still equal transformers' on the file."""
    from transformers import AutoModelForCausalLM

    path = tmp_path / "q5_0.gguf"
    write_tiny_llama(path, LAYOUTS["q"], foreign={"ffn_up": "Q5_0"})
    manifest = _compile_tiny(path, 2, tmp_path / "out")
    up = [f"hf.model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]
    assert manifest["extra"]["quant"]["dequantized"] == dict.fromkeys(up, "Q5_0")
    assert not any(name in manifest["extra"]["quant"]["tensors"] for name in up)
    [warning] = [w for w in manifest["warnings"] if "no kernel" in w]
    assert re.fullmatch(
        rf"2 quantized tensors \(Q5_0\) have no kernel and are stored dequantized: {re.escape(up[0])} "
        r"\(and 1 more\), [0-9.]+ MiB more than in the source \(tpcompile explain lists them\)",
        warning,
    ), warning
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 2, 63, 17, 4, 8, 11, 40]])
    with torch.no_grad():
        want = reference.eval()(ids).logits
    torch.testing.assert_close(_logits(tmp_path / "out", ids), want, atol=1e-4, rtol=1e-4)


def test_a_type_that_cannot_be_read_is_refused_in_one_line(tmp_path: Path) -> None:
    """Q8_1, which the installed gguf cannot dequantize: exit 3, one line naming the tensor and its type,
    nothing written."""
    path = tmp_path / "q8_1.gguf"
    write_tiny_llama(path, LAYOUTS["q"], foreign={"ffn_up": "Q8_1"})
    out = tmp_path / "out"
    proc = tpcompile(path, "--tp", "2", "-o", out, "--quiet", "--no-native")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"tpcompile: error: {path}: tensor blk.0.ffn_up.weight is quantized as Q8_1, which the installed "
        "gguf package cannot dequantize (Dequantization for Q8_1 is not yet implemented)"
    ]
    assert not out.exists()


# -- SmolLM2 Q4_1 -------------------------------------------------------------------------------------------

PROMPTS = ["Write a haiku about the sea.", "What is 12 times 7?"]  # "Why is the sky blue?": test_llm_e2e


@pytest.mark.slow
def test_smollm2_kept_quantized_greedy_equals_transformers(
    compiled_smollm2: Any, smollm2_model: Any, tmp_path: Path
) -> None:
    """The Q4_1 file compiled without --dequantize at tp=2: its shards hold the file's blocks (the largest
    rank at most 0.6 x the file), and greedy answers to several prompts equal transformers running the same
    file (dequantized) token for token."""
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
    for result in results:
        with torch.no_grad():
            ids = torch.tensor([result["prompt_ids"]])
            want = smollm2_model.generate(ids, max_new_tokens=64, do_sample=False, top_k=None, top_p=None)
        assert result["new_ids"] == [int(t) for t in want[0, ids.shape[1] :]]
