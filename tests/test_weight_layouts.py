"""Plans come from how a program uses its weights, whatever layout it reads them in: ``x @ W``, ``x @ W.T``,
einsum projections, tables read by indexing and tied outputs, and the same program after
``run_decompositions()``; and the rule table behind it has exactly one rule per op."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tests import raw_gpt
from tests.conftest import tpcompile, tprun
from tests.simulate import simulate
from tpcompile.compiler import plan_model
from tpcompile.frontend.capture import CapturedModel, captured_program
from tpcompile.passes.ops import rule_table
from tpcompile.passes.ops.registry import RegistryError, aten_ops, register
from tpcompile.passes.slicing import local_shape
from tpcompile.runtime.format.placement import Shard

aten = torch.ops.aten


def _captured(decomposed: bool) -> CapturedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return captured_program(raw_gpt.export(decomposed), "RawGPT")


def _weight_shares(captured: CapturedModel, tp: int) -> list[float]:
    """Each rank's stored elements as a share of the model's."""
    _, prop = plan_model(captured, tp)
    names = captured.state_names()
    total = sum(n.meta["val"].numel() for n in names)
    shares = []
    for rank in range(tp):
        local = [local_shape(tuple(n.meta["val"].shape), prop.roots[n], rank) for n in names]
        shares.append(sum(torch.Size(s).numel() for s in local) / total)
    return shares


# -- the rule table ------------------------------------------------------------------------------------


def test_registering_an_op_twice_raises() -> None:
    with pytest.raises(RegistryError, match="aten.view already has the rule .*views.reshape"):
        register(aten.view)(lambda ctx, node: None)  # type: ignore[arg-type,return-value]


def test_registering_an_overload_or_an_unknown_op_raises() -> None:
    with pytest.raises(RegistryError, match="register the packet aten.view, not the overload"):
        register(aten.view.default)(lambda ctx, node: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(RegistryError, match="torch has no op aten.no_such_op"):
        aten_ops("add", "no_such_op")


def test_rule_table_has_one_deliberate_rule_per_op() -> None:
    table = rule_table()
    for op in table:  # every entry names a real op packet of this torch (or a Python callable)
        if op.startswith("aten."):
            assert isinstance(getattr(aten, op.removeprefix("aten.")), torch._ops.OpOverloadPacket), op
    # the former duplicates, each decided once
    assert table["aten.copy"] == table["aten.copy_"] == "tpcompile.passes.ops.indexing.copy"
    for op in ("aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy"):
        assert table[op] == "tpcompile.passes.ops.views.identity", op
    assert table["aten.mul_"] == table["aten.mul"] == "tpcompile.passes.ops.pointwise.pointwise[scaling]"
    for op in ("aten.linear", "aten.mm", "aten.matmul", "aten.einsum", "aten.embedding", "aten.index"):
        assert op in table


# -- any weight layout is a plan site ---------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_raw_parameter_gpt_equals_the_original(tp: int) -> None:
    captured = _captured(decomposed=False)
    idx = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        expected = raw_gpt.export().module()(idx)
    for outs in simulate(captured, tp, [idx]):
        torch.testing.assert_close(outs[0], expected, atol=1e-5, rtol=0)
    assert max(_weight_shares(_captured(decomposed=False), tp)) <= 1 / tp + 0.10


def test_raw_parameter_gpt_splits_every_layout() -> None:
    captured = _captured(decomposed=False)
    plan, prop = plan_model(captured, 3)
    placements = {name: prop.roots[n] for n, name in captured.state_names().items()}
    styles = {name: prop.style(n).value for n, name in captured.state_names().items()}
    assert placements["wq.0"] == Shard(1, (2, 2, 2))  # einsum "btd,dhk": heads
    assert placements["wk.0"] == Shard(0, (16, 16, 16))  # x @ Wk.T: [out, in]
    assert placements["wv.0"] == Shard(1, (16, 16, 16))  # x @ Wv: [in, out]
    assert placements["wo.0"] == Shard(0, (16, 16, 16)) and styles["wo.0"] == "rowwise"
    assert placements["embed"] == Shard(0, (33, 32, 32)) and styles["embed"] == "vocab"  # E[idx], x @ E.T
    assert (styles["wq.0"], styles["wk.0"], styles["wv.0"], styles["w_up.0"]) == ("colwise",) * 4
    assert plan.unsplit == {}


def test_decomposed_program_plans_like_the_original() -> None:
    original, decomposed = _captured(decomposed=False), _captured(decomposed=True)
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        expected = raw_gpt.export().module()(idx)
    for outs in simulate(decomposed, 2, [idx]):
        torch.testing.assert_close(outs[0], expected, atol=1e-5, rtol=0)
    _, prop_a = plan_model(original, 2)
    _, prop_b = plan_model(decomposed, 2)
    roots_a = {name: prop_a.roots[n] for n, name in original.state_names().items()}
    roots_b = {name: prop_b.roots[n] for n, name in decomposed.state_names().items()}
    assert roots_a == roots_b
    assert max(_weight_shares(_captured(decomposed=True), 2)) <= 0.5 + 0.10


def test_decomposed_program_compiles_and_runs_on_two_ranks(tmp_path: Path) -> None:
    """The real path: a .pt2 saved after run_decompositions(), compiled by tpcompile, run by tprun."""
    pt2 = tmp_path / "raw_gpt_decomposed.pt2"
    torch.export.save(raw_gpt.export(decomposed=True), pt2)
    out = tmp_path / "out"
    proc = tpcompile(pt2, "--tp", "2", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    plans = {p["name"]: p["plan"] for p in manifest["parameters"]}
    assert plans["wq.0"] == plans["wk.0"] == plans["w_up.0"] == "colwise"
    assert plans["embed"] == "vocab" and plans["w_down.0"] == "rowwise"
    assert max(r["weight_bytes"] for r in manifest["ranks"]) <= 0.6 * manifest["total_weight_bytes"]
    idx = torch.randint(0, 97, (1, 13))
    save_file({"idx": idx}, str(tmp_path / "in.safetensors"))
    proc = tprun(out, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "res.safetensors")
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = raw_gpt.export().module()(idx)
    torch.testing.assert_close(
        load_file(str(tmp_path / "res.safetensors"))["output"], expected, atol=1e-5, rtol=0
    )


# -- a weight left whole is reported --------------------------------------------------------------


class SoftmaxHead(nn.Module):
    """``softmax(x @ W)`` then a projection: splitting ``W`` would need its outputs gathered before the
    softmax (an all-gather inside the program), so the plan keeps it whole and says why."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 12) * 0.1)
        self.v = nn.Parameter(torch.randn(12, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.w, dim=-1) @ self.v


def test_a_weight_left_replicated_is_reported_with_its_reason(tmp_path: Path) -> None:
    x = torch.randn(2, 5, 16)
    captured = captured_program(torch.export.export(SoftmaxHead().eval(), (x,)), "SoftmaxHead")
    with torch.no_grad():
        expected = captured.program.module()(x)
    plan, _ = plan_model(captured, 2)
    assert plan.unsplit == {"w": "splitting it would need an all-gather inside the program"}
    for outs in simulate(captured, 2, [x]):  # v is still split (row-parallel after a sliced softmax)
        torch.testing.assert_close(outs[0], expected, atol=1e-6, rtol=0)

    out = tmp_path / "out"
    proc = tpcompile("tests.factories:softmax_head", "--tp", "2", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert (
        "tpcompile: note: w stays replicated: splitting it would need an all-gather inside the program"
        in (proc.stderr)
    )
    explained = tpcompile("explain", out)
    assert explained.returncode == 0, explained.stderr
    assert "left replicated (a split was considered):" in explained.stdout
    assert "  w: splitting it would need an all-gather inside the program" in explained.stdout
