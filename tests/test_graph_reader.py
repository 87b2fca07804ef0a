"""``read_program``: a rank's program.pt2 read into the module ``torch.export.load(path).module()`` gives,
node for node, without torch's deserializer; ``None`` for the archives only torch reads, which the
loader then loads with torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx
from torch.utils._pytree import tree_leaves, tree_map

from tests.checkpoints import save_smollm2_tokenizer, tiny_checkpoint
from tests.conftest import cli_env, tpcompile
from tpcompile.artifact.program import save_program
from tpcompile.runtime.load.exported_load import load_exported
from tpcompile.runtime.load.graph_reader import read_program


def _structure(module: fx.GraphModule) -> tuple[Any, ...]:
    """Every node (op, name, target, args and kwargs with nodes by name), the returned values, and the
    module's parameters and buffers (with which buffers are saved in its state dict)."""

    def named(value: Any) -> Any:
        return ("node", value.name) if isinstance(value, fx.Node) else value

    nodes: list[Any] = []
    for node in module.graph.nodes:
        if node.op == "output":  # a tuple or one value: as torch's codegen returns it, compared flat
            nodes.append([named(v) for v in tree_leaves(node.args, is_leaf=lambda v: isinstance(v, fx.Node))])
        else:
            nodes.append(
                (
                    node.op,
                    node.name,
                    str(node.target),
                    tree_map(named, node.args),
                    tree_map(named, node.kwargs),
                )
            )
    params = [(k, v.shape, v.dtype, v.requires_grad) for k, v in module.named_parameters()]
    buffers = [(k, v.shape, v.dtype) for k, v in module.named_buffers()]
    return nodes, params, buffers, sorted(module.state_dict())


class _Kinds(torch.nn.Module):
    """The argument and output kinds a rank program holds: symbolic sizes (``sym_size`` and ``_operator``
    calls on them), two outputs (topk), a list output (chunk), -inf, dtype / device / layout arguments,
    keyword-only arguments, a persistent buffer, and a tuple returned."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.proj(x) * self.scale
        top, where = y.topk(2, dim=-1)
        a, b = y.chunk(2, dim=-1)
        masked = y.masked_fill(y > 0.5, float("-inf")).softmax(-1)
        count = torch.zeros(x.shape[0], 3, dtype=torch.int64, device=x.device).sum(dim=1, keepdim=True)
        rows = y.reshape(x.shape[0] * 2, 4)[: x.shape[0] + 1]
        return top, where.to(torch.float32), a + b, masked, count + ids, rows


def _saved(tmp_path: Path, model: torch.nn.Module, *, sample_inputs: bool = False) -> Path:
    seq = torch.export.Dim("seq", min=2, max=64)
    inputs = (torch.randn(5, 8), torch.arange(5).reshape(5, 1))
    program = torch.export.export(model, inputs, dynamic_shapes=({0: seq}, {0: seq}), strict=False)
    path = tmp_path / "program.pt2"
    if sample_inputs:
        torch.export.save(program, str(path))  # torch.export.save keeps them; tpcompile's save drops them
        return path
    state = program.state_dict
    for name, value in state.items():  # as tpcompile stores a rank's program: weights as shapes only
        meta = value.to("meta")
        state[name] = (
            torch.nn.Parameter(meta, requires_grad=False) if isinstance(value, torch.nn.Parameter) else meta
        )
    save_program(program, path)
    return path


def test_the_module_torch_gives_node_for_node_and_the_same_results(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Kinds().eval()
    path = _saved(tmp_path, model)
    got, want = read_program(path), load_exported(path).module()
    assert got is not None
    assert _structure(got) == _structure(want)
    targets = {str(n.target) for n in got.graph.nodes}
    assert {"<built-in function mul>", "aten.sym_size.int", "<built-in function getitem>"} <= targets
    for module in (got, want):  # their tensors are meta tensors until the runtime assigns the weights
        module.load_state_dict(model.state_dict(), assign=True)
    x, ids = torch.randn(9, 8), torch.arange(9).reshape(9, 1)
    for mine, theirs, eager in zip(got(x, ids), want(x, ids), model(x, ids), strict=True):
        assert torch.equal(mine, theirs) and torch.equal(mine, eager)


class _NonPersistent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(8.0), persistent=False)  # stored as a constant

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x * self.table + ids


@pytest.mark.parametrize("case", ["sample inputs", "constants"])
def test_archives_only_torch_reads_are_left_to_torch(case: str, tmp_path: Path) -> None:
    """Sample inputs (``module()`` checks calls against them) and constants: ``None``, and the loader's
    fallback still runs them."""
    model = _Kinds() if case == "sample inputs" else _NonPersistent()
    path = _saved(tmp_path, model, sample_inputs=case == "sample inputs")
    assert read_program(path) is None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory, gpt_pt2: Path) -> list[Path]:
    """A tiny Llama (KV cache, a vocabulary-parallel head) and the example GPT (.pt2, a dynamic length),
    each compiled at tp=2 as tpcompile writes them."""
    root = tmp_path_factory.mktemp("reader")
    llama = tiny_checkpoint("llama", root / "llama", save_smollm2_tokenizer(root / "tokenizer"))
    out = []
    for name, source, extra in (("llama", llama, ("--max-seq-len", "64")), ("gpt", gpt_pt2, ())):
        art = root / f"{name}-tp2"
        done = tpcompile(source, "--tp", "2", "-o", art, "--quiet", *extra)
        assert done.returncode == 0, done.stderr
        out += [art / "rank0" / "program.pt2", art / "rank1" / "program.pt2"]
    return out


def test_compiled_rank_programs_read_as_torch_reads_them(compiled: list[Path]) -> None:
    for path in compiled:
        got = read_program(path)
        assert got is not None, path
        assert _structure(got) == _structure(load_exported(path).module()), path


def test_a_rank_loads_without_torch_dynamo(compiled: list[Path]) -> None:
    """torch.export.load imports torch._dynamo (~1.5 s of every rank's start-up); the reader does not."""
    artifact = compiled[0].parents[1]
    code = (
        "import sys\n"
        "from tpcompile.runtime.load.loader import load_rank\n"
        f"load_rank({str(artifact)!r}, 1)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "False\n"
