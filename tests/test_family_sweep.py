"""No shape of model state is an internal error: 0-dim tensors are stored and loaded like any other, and
every supported family's tiny config compiles at tp=2 through the real ``tpcompile``, so a crash cannot hide
behind a family that was tested with one config shape only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tests import test_arch_dense, test_arch_encoder, test_moe
from tests.checkpoints import TINY_CONFIGS, tiny_checkpoint
from tests.conftest import tpcompile, tprun
from tpcompile.artifact.safetensors_writer import DTYPE_CODES, write_safetensors
from tpcompile.compiler import compile_model
from tpcompile.frontend import load_model
from tpcompile.frontend.options import LanguageModelOptions


def test_zero_dim_tensors_of_every_dtype_round_trip(tmp_path: Path) -> None:
    tensors = {}
    for i, dtype in enumerate(DTYPE_CODES):
        value = torch.tensor(i % 2 == 1) if dtype == torch.bool else torch.tensor(i + 1.5).to(dtype)
        tensors[f"scalar_{str(dtype).removeprefix('torch.')}"] = value
    tensors["vector"] = torch.arange(3, dtype=torch.float32)
    path = tmp_path / "w.safetensors"
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    nbytes = write_safetensors(path, specs, tensors.__getitem__)
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].shape == t.shape and loaded[name].dtype == t.dtype, name
        assert torch.equal(loaded[name], t), name


class ScalarState(nn.Module):
    """A scalar parameter and a scalar buffer beside a projection that is split."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Parameter(torch.randn(32, 64, generator=g) * 0.2)
        self.down = nn.Parameter(torch.randn(64, 32, generator=g) * 0.2)
        self.scale = nn.Parameter(torch.tensor(1.75))
        self.register_buffer("shift", torch.tensor(-0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.relu(x @ self.up) @ self.down) * self.scale + self.shift


def scalar_state() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``tpcompile`` factory of :class:`ScalarState`."""
    return ScalarState().eval(), (torch.randn(2, 5, 32),)


def test_program_with_scalar_state_compiles_and_equals_the_original(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = tpcompile("tests.test_family_sweep:scalar_state", "--tp", "2", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    shards = [load_file(str(out / f"rank{r}" / "weights.safetensors")) for r in range(2)]
    assert all(s["scale"].shape == () and s["shift"].shape == () for s in shards)
    assert [tuple(s["up"].shape) for s in shards] == [(32, 32), (32, 32)]  # the projections are still split
    x = torch.randn(2, 5, 32)
    save_file({"x": x}, str(tmp_path / "in.safetensors"))
    proc = tprun(out, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "res.safetensors")
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = ScalarState().eval()(x)
    got = load_file(str(tmp_path / "res.safetensors"))["output"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


SWEEP = (
    [f"dense:{name}" for name in sorted(TINY_CONFIGS)]
    + [f"arch:{name}" for name in sorted(test_arch_dense.FAMILIES)]
    + [f"moe:{name}" for name in sorted(test_moe.CONFIGS)]
    + ["encoder:bert"]
)


def _checkpoint(case: str, out: Path) -> Path:
    kind, name = case.split(":")
    if kind == "dense":
        return tiny_checkpoint(name, out, None)
    if kind == "arch":
        return test_arch_dense.write_checkpoint(name, out)
    if kind == "moe":
        return test_moe.write_checkpoint(name, out, None)
    return test_arch_encoder.write_bert(out)


@pytest.mark.parametrize("case", SWEEP)
def test_every_family_compiles_at_tp2(case: str, tmp_path: Path) -> None:
    """The CLI's whole compile in-process (an exception that is not a TpCompileError is what the CLI
    reports as an internal error): reading, planning, weights, rank programs, manifest."""
    ckpt = _checkpoint(case, tmp_path / "ckpt")
    captured = load_model(str(ckpt), lm=LanguageModelOptions(max_seq_len=32))
    result = compile_model(captured, 2, tmp_path / "out")
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert len(result.manifest.ranks) == 2
