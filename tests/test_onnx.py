"""The ONNX format (``tpcompile ... --format onnx``): per-rank ONNX segments cut at the collectives, run by
stock onnxruntime with the collectives on torch.distributed in between.

Each artifact is compared with the torch-format artifact of the same model on real gloo ranks: outputs
within 1e-4 and identical greedy tokens for 32 new tokens. The example GPT (no KV cache: every step re-runs
the whole sequence), a tiny random Llama (KV cache: prefill + decode through ``tprun --prompt``) and, as a
slow test, SmolLM2-135M-Instruct from its GGUF file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.checkpoints import save_smollm2_tokenizer, smollm2_gguf, tiny_checkpoint
from tests.conftest import SMOLLM2_SEQ_LEN, tpcompile, tprun
from tpcompile.errors import UsageError
from tpcompile.onnx.artifact import convert_artifact
from tpcompile.runtime.launch.launcher import free_port
from tpcompile.runtime.lm.generate import CausalLM
from tpcompile.runtime.load.loader import load_rank
from tpcompile.runtime.transport.collectives import gather_outputs

NEW_TOKENS = 32
PROMPT = "Why is the sky blue?"
_STANDARD_DOMAINS = {"", "ai.onnx"}


def _run_both(rank: int, world: int, port: int, dirs: list[str], prompt: list[int], result: str) -> None:
    """One spawned rank: the same prompt through the torch and the ONNX artifact; rank 0 saves
    ``{format: (full-sequence outputs, greedy new ids)}``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in dirs:
            program = load_rank(name, rank)
            placements = [s.placement for s in program.manifest.outputs]
            ids = torch.tensor([prompt])
            if program.manifest.is_causal_lm:
                (logits,) = gather_outputs(program(ids, torch.arange(len(prompt))), placements)
                new = CausalLM(program).generate(prompt, max_new_tokens=NEW_TOKENS)
            else:
                (logits,) = gather_outputs(program(ids), placements)
                new = []
                for _ in range(NEW_TOKENS):  # greedy, re-running the whole sequence each step
                    (out,) = gather_outputs(program(ids), placements)
                    new.append(int(out[0, -1].argmax()))
                    ids = torch.cat([ids, torch.tensor([[new[-1]]])], 1)
            results[program.manifest.format] = (logits, new)
        if rank == 0:
            torch.save(results, result)
    finally:
        dist.destroy_process_group()


def _compare(torch_dir: Path, onnx_dir: Path, prompt: list[int], tmp: Path) -> tuple[torch.Tensor, list[int]]:
    """Both artifacts on two spawned gloo ranks: outputs within fp32 round-off (1e-4 + 1e-5 relative: logits
    reach ~30), the same 32 greedy tokens. Returns
    the torch artifact's outputs and tokens."""
    result = tmp / "both.pt"
    args = (2, free_port(), [str(torch_dir), str(onnx_dir)], prompt, str(result))
    mp.spawn(_run_both, args=args, nprocs=2, join=True)
    got = torch.load(result)
    (ref_logits, ref_new), (onnx_logits, onnx_new) = got["torch"], got["onnx"]
    assert ref_logits.shape == onnx_logits.shape
    torch.testing.assert_close(onnx_logits, ref_logits, rtol=1e-5, atol=1e-4)  # fp32 round-off
    assert onnx_new == ref_new and len(ref_new) == NEW_TOKENS
    return ref_logits, ref_new


def _check_onnx_artifact(out: Path, tp: int) -> dict[str, Any]:
    """Manifest: format, each rank's segments and the collectives between them (as many as the torch
    program has, in the same order on every rank); every segment passes the ONNX checker, uses only
    standard ONNX ops and keeps its weights in the rank's safetensors file."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx"
    ranks = manifest["extra"]["onnx"]["ranks"]
    assert sorted(ranks) == [str(r) for r in range(tp)]
    collective_ops = [c["op"] for c in manifest["collectives"]]
    per_rank = []
    for r in range(tp):
        rank_dir = out / f"rank{r}"
        steps = ranks[str(r)]["steps"]
        kinds = [s["kind"] for s in steps]
        per_rank.append([k for k in kinds if k != "segment"])
        assert sorted(per_rank[-1]) == sorted(collective_ops)
        assert all(a != b or a == "segment" for a, b in zip(kinds, kinds[1:], strict=False))
        files = [s["file"] for s in steps if s["kind"] == "segment"]
        assert not (rank_dir / "program.pt2").exists()
        assert sorted(manifest["ranks"][r]["files"]) == sorted([*files, "weights.safetensors"])
        for f in files:
            path = rank_dir / f
            onnx.checker.check_model(str(path), full_check=True)
            model = onnx.load(str(path), load_external_data=False)
            assert {n.domain for n in model.graph.node} <= _STANDARD_DOMAINS
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    data = {e.key: e.value for e in init.external_data}
                    assert data["location"] == "weights.safetensors"
                    assert int(data["offset"]) % 4096 == 0  # onnxruntime memory-maps only aligned data
        weights = (rank_dir / "weights.safetensors").stat().st_size
        assert sum((rank_dir / f).stat().st_size for f in files) < weights / 4  # no weight copied
    assert all(p == per_rank[0] for p in per_rank)
    return manifest


@pytest.fixture(scope="module")
def gpt_artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The example GPT at tp=2, compiled to the torch and to the ONNX format."""
    root = tmp_path_factory.mktemp("onnx-gpt")
    torch_dir, onnx_dir = root / "gpt-torch", root / "gpt-onnx"
    for out, fmt in ((torch_dir, "torch"), (onnx_dir, "onnx")):
        done = tpcompile("examples.gpt:build", "--tp", 2, "-o", out, "--format", fmt, "--quiet")
        assert done.returncode == 0, done.stderr
    return torch_dir, onnx_dir


def test_gpt_onnx_equals_torch(gpt_artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    torch_dir, onnx_dir = gpt_artifacts
    manifest = _check_onnx_artifact(onnx_dir, 2)
    assert json.loads((torch_dir / "manifest.json").read_text())["format"] == "torch"
    assert [c["op"] for c in manifest["collectives"]].count("all_gather") == 1
    prompt = [int(t) for t in torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(7))]
    logits, _ = _compare(torch_dir, onnx_dir, prompt, tmp_path)

    # and through tprun --inputs (same-host ranks exchange through shared memory)
    save_file({"idx": torch.tensor([prompt])}, str(tmp_path / "in.safetensors"))
    ran = tprun(onnx_dir, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors")
    assert ran.returncode == 0, ran.stderr
    output = load_file(str(tmp_path / "out.safetensors"))["output"]
    assert (output - logits).abs().max().item() <= 1e-4


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The (start, end) file offsets of this process's memory mappings of ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((int(fields[2], 16), int(fields[2], 16) + hi - lo))
    return ranges


def test_onnx_weights_are_memory_mapped(gpt_artifacts: tuple[Path, Path]) -> None:
    """The ONNX artifact keeps one weights file per rank, the torch artifact's tensors at page-aligned
    offsets (uint8 padding tensors in the gaps), and onnxruntime memory-maps every one of them."""
    from safetensors import safe_open

    from tpcompile.onnx.aligned import PAD_PREFIX
    from tpcompile.onnx.export import safetensors_offsets

    torch_dir, onnx_dir = gpt_artifacts
    weights = onnx_dir / "rank0" / "weights.safetensors"
    want = load_file(str(torch_dir / "rank0" / "weights.safetensors"))
    with safe_open(str(weights), "pt") as f:
        pads = [k for k in f.keys() if k.startswith(PAD_PREFIX)]  # noqa: SIM118 (no __iter__)
        assert pads and sorted(set(f.keys()) - set(pads)) == sorted(want)
        for name, tensor in want.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    offsets = {k: v for k, v in safetensors_offsets(weights).items() if not k.startswith(PAD_PREFIX)}
    assert all(offset % 4096 == 0 for offset, _, _, _ in offsets.values())

    assert _mapped_ranges(weights) == []
    program = load_rank(str(onnx_dir), 0)  # checks the manifest's hash of the rewritten file
    mapped = _mapped_ranges(weights)
    unmapped = [
        name
        for name, (offset, length, _, _) in offsets.items()
        if not any(lo <= offset and offset + length <= hi for lo, hi in mapped)
    ]
    assert unmapped == []
    del program


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx-llama")
    return tiny_checkpoint("llama", root / "llama", save_smollm2_tokenizer(root / "tokenizer"))


def test_kv_cache_llama_onnx_equals_torch(tiny_llama: Path, tmp_path: Path) -> None:
    """Prefill and decode with the KV cache as explicit segment inputs/outputs, through ``tprun --prompt``."""
    torch_dir, onnx_dir = tmp_path / "llama-torch", tmp_path / "llama-onnx"
    done = tpcompile(tiny_llama, "--tp", 2, "-o", torch_dir, "--max-seq-len", 96, "--quiet")
    assert done.returncode == 0, done.stderr
    convert_artifact(str(torch_dir), str(onnx_dir))  # the Python API takes str paths as well
    manifest = _check_onnx_artifact(onnx_dir, 2)
    inputs = [s["name"] for s in manifest["extra"]["onnx"]["ranks"]["0"]["inputs"]]
    assert inputs[:2] == ["input_ids", "cache_position"]
    assert sorted(inputs[2:]) == sorted(f"in.{name}" for name in manifest["zero_state"])
    saved = tmp_path / "tokens.json"
    ran = tprun(onnx_dir, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--save-tokens", saved)
    assert ran.returncode == 0, ran.stderr
    assert "decode: " in ran.stderr
    tokens = json.loads(saved.read_text())[0]
    _, want = _compare(torch_dir, onnx_dir, tokens["prompt_ids"], tmp_path)
    assert tokens["new_ids"] == want


@pytest.mark.slow
def test_smollm2_tp2_onnx_equals_torch(compiled_smollm2: Any, tmp_path: Path) -> None:
    """The GGUF's weights stay quantized by default, which ONNX cannot run: the conversion refuses that
    artifact in one line and converts the --dequantize one."""
    with pytest.raises(UsageError, match=r"stores \d+ weights quantized .*recompile it with --dequantize$"):
        convert_artifact(compiled_smollm2(2), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    torch_dir, onnx_dir = tmp_path / "smollm2-floats", tmp_path / "smollm2-onnx"
    args = ("--tp", 2, "-o", torch_dir, "--max-seq-len", SMOLLM2_SEQ_LEN, "--dequantize", "--quiet")
    done = tpcompile(smollm2_gguf(), *args)
    assert done.returncode == 0, done.stderr
    convert_artifact(torch_dir, onnx_dir)
    _check_onnx_artifact(onnx_dir, 2)
    # "Why is the sky blue?" through SmolLM2's chat template: the answer runs past 32 tokens
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407]
    prompt += [19712, 8182, 2, 198, 1, 4093, 198, 4898, 314, 260, 6376, 4461, 47, 2, 198, 1, 520, 9531, 198]
    _compare(torch_dir, onnx_dir, prompt, tmp_path)


class _Cache(torch.nn.Module):
    def __init__(self, view_write: bool) -> None:
        super().__init__()
        self.view_write = view_write
        self.register_buffer("cache", torch.zeros(4, 3))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.view_write:
            self.cache[:2].copy_(x[:2])
        else:
            self.cache.index_copy_(0, pos, x)
        return self.cache.sum(0) * 2


def test_kv_cache_writes_become_explicit_outputs() -> None:
    """In place -> out of place, the buffer an input and its new value an output; a write into a view of
    the buffer is refused with a one-line message."""
    from tpcompile.errors import UnsupportedModelError
    from tpcompile.onnx.functional import stateful_module

    x, pos = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 3])
    program = torch.export.export(_Cache(False), (x, pos))
    stateful = stateful_module(program, {"cache"})
    assert stateful.state == ["cache"] and stateful.n_outputs == 1
    out, new_cache = stateful.module(x, pos, torch.ones(4, 3))
    want = torch.ones(4, 3).index_copy(0, pos, x)
    assert torch.equal(new_cache, want) and torch.equal(out, want.sum(0) * 2)
    with pytest.raises(UnsupportedModelError, match="writes into a view of a KV cache buffer"):
        stateful_module(torch.export.export(_Cache(True), (x, pos)), {"cache"})


def test_manifest_format_errors(tmp_path: Path) -> None:
    from tpcompile.runtime.errors import ManifestError
    from tpcompile.runtime.format import Manifest, artifact_format, onnx_rank

    def manifest(raw: dict[str, Any]) -> Manifest:
        return Manifest(1, "tp", [], [], [], path=tmp_path, **raw)

    assert artifact_format(manifest({})) == "torch"
    assert artifact_format(manifest({"format": "onnx"})) == "onnx"
    with pytest.raises(ManifestError, match="unknown artifact format 'tflite'; upgrade tpcompile"):
        artifact_format(manifest({"format": "tflite"}))
    missing = r"extra.onnx.ranks\[0\] is missing; recompile with --format onnx"
    with pytest.raises(ManifestError, match=missing):
        onnx_rank(manifest({"format": "onnx", "extra": {}}), 0)
    bad = {"format": "onnx", "extra": {"onnx": {"ranks": {"0": {"inputs": [], "outputs": [], "steps": [
        {"kind": "reduce_scatter"}]}}}}}  # fmt: skip
    with pytest.raises(ManifestError, match="unknown step kind 'reduce_scatter'; upgrade tpcompile"):
        onnx_rank(manifest(bad), 0)
