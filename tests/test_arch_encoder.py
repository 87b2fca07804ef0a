"""A BERT-style encoder from its Hugging Face checkpoint (a ``BertForMaskedLM`` checkpoint, read by its base
model) through the generic path: ``forward(input_ids, attention_mask) -> last_hidden_state``. Every rank's
program is run in-process at tp = 1..4 (12 heads, 160 MLP features: uneven at tp = 3) and compared
with transformers' ``AutoModel`` on a padded batch; tp = 2 also runs on gloo processes (``tprun --inputs``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import random_checkpoint
from tests.conftest import tpcompile, tprun
from tests.simulate import Simulator
from tpcompile.artifact.describe import collective_entries
from tpcompile.frontend.capture import CapturedModel
from tpcompile.frontend.hf import load_hf
from tpcompile.frontend.hf_encoder import is_encoder
from tpcompile.runtime.format.placement import Replicate

LAYERS = 2
VOCAB = 1000


def write_bert(out: Path) -> Path:
    """A random-weight BertForMaskedLM checkpoint (read by tpcompile as its base encoder)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=12,
        intermediate_size=160,
        max_position_embeddings=64,
    )
    return random_checkpoint(config, out, vector_std=0.1, build=BertForMaskedLM)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, CapturedModel]:
    from transformers import AutoModel

    path = write_bert(tmp_path_factory.mktemp("bert"))
    reference = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    return path, reference, load_hf(path, max_batch_size=2)


def _inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seq)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - 3 :] = 0  # the last row is padded
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen), "attention_mask": mask}


def test_encoder_detection(bert: tuple[Path, Any, CapturedModel]) -> None:
    from transformers import AutoConfig

    assert is_encoder(AutoConfig.from_pretrained(str(bert[0])))
    llama = AutoConfig.for_model("llama", architectures=["LlamaForCausalLM"])
    assert not is_encoder(llama) and not is_encoder(AutoConfig.for_model("llama"))


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_hidden_states_equal_transformers(tp: int, bert: tuple[Path, Any, CapturedModel]) -> None:
    _, reference, captured = bert
    sim = Simulator(captured, tp)
    for seq in (9, 17):  # one program, any sequence length
        inputs = _inputs(2, seq)
        with torch.no_grad():
            want = reference(**inputs).last_hidden_state
        for outs in sim.run([inputs["input_ids"], inputs["attention_mask"]]):
            torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=0)
    entries = collective_entries(sim.prop)
    assert {e.op for e in entries} <= {"all_reduce"}
    per_layer = Counter(m.group(1) for e in entries if (m := re.search(r"layer\.(\d+)\.", e.scope)))
    if tp > 1:
        assert per_layer == Counter({str(i): 2 for i in range(LAYERS)})
        # the embeddings' sum: word and position tables are vocabulary-parallel; the 2-row token-type table
        # is split at tp = 2, replicated (and its partial neighbours reduced first) at tp >= 3
        assert len(entries) == 2 * LAYERS + (1 if tp == 2 else 2)
        names = captured.state_names()
        weights = [
            n for n in sim.prop.roots if n.meta["val"].dim() == 2 and n.meta["val"].is_floating_point()
        ]
        replicated = [names[n] for n in weights if sim.prop.roots[n] == Replicate()]
        assert replicated == ([] if tp == 2 else ["hf.embeddings.token_type_embeddings.weight"])


def test_tprun_inputs_on_real_processes(bert: tuple[Path, Any, CapturedModel], tmp_path: Path) -> None:
    path, reference, _ = bert
    out = tmp_path / "out"
    compiled = tpcompile(path, "--tp", "2", "-o", out, "--max-batch-size", "2", "--quiet")
    assert compiled.returncode == 0, compiled.stderr
    inputs = _inputs(2, 11)
    save_file(inputs, str(tmp_path / "in.safetensors"))
    ran = tprun(out, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors")
    assert ran.returncode == 0, ran.stderr
    with torch.no_grad():
        want = reference(**inputs).last_hidden_state
    torch.testing.assert_close(
        load_file(str(tmp_path / "out.safetensors"))["output"], want, atol=1e-5, rtol=0
    )
