"""``load_exported``: the program ``torch.export.load`` gives, with the two memoized functions restored."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import sympy
import torch

from tpcompile.runtime.load.exported_load import load_exported


class _Attention(torch.nn.Module):
    """Shapes that depend on a dynamic length (``s0``, ``s0 + 1``, ``2*s0``): sympy expressions to parse."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.proj(x), extra], dim=0)
        scores = y @ y.T
        return torch.cat([scores, scores], dim=1).softmax(-1)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(
        _Attention(), (torch.randn(5, 8), torch.randn(1, 8)), dynamic_shapes=({0: seq}, None)
    )
    path = tmp_path / "program.pt2"
    torch.export.save(ep, str(path))
    return path


def test_the_same_program_as_torch_export_load(saved: Path) -> None:
    want, got = torch.export.load(str(saved)), load_exported(saved)
    assert got.graph_module.code == want.graph_module.code
    assert str(got.graph) == str(want.graph)
    assert str(got.range_constraints) == str(want.range_constraints)
    assert got.graph_signature == want.graph_signature
    assert [str(n.meta["val"]) for n in got.graph.nodes if "val" in n.meta] == [
        str(n.meta["val"]) for n in want.graph.nodes if "val" in n.meta
    ]
    x, extra = torch.randn(11, 8), torch.randn(1, 8)
    assert torch.equal(got.module()(x, extra), want.module()(x, extra))


def test_the_memoized_functions_are_restored_after_success_and_failure(saved: Path, tmp_path: Path) -> None:
    hints, sympify = typing.get_type_hints, sympy.sympify
    load_exported(saved)
    assert (typing.get_type_hints, sympy.sympify) == (hints, sympify)
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(Exception) as raised:
        load_exported(broken)
    with pytest.raises(type(raised.value)):
        torch.export.load(str(broken))
    assert (typing.get_type_hints, sympy.sympify) == (hints, sympify)
