"""Tests of tpcompile.runtime against a tiny tp=2 artifact built by hand (no compiler)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed._functional_collectives  # noqa: F401  (registers _c10d_functional)
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import write_manifest
from tpcompile.runtime import (
    ArtifactCorrupt,
    ArtifactLoadError,
    InputError,
    ManifestError,
    load_artifact_manifest,
    load_rank,
    run_artifact,
    verify_rank_files,
)
from tpcompile.runtime.format import SymbolRange
from tpcompile.runtime.launch.args import BACKEND_CHOICES, WorkerArgs
from tpcompile.runtime.lm.sampling import SamplingConfig
from tpcompile.runtime.lm.session import GenerationArgs
from tpcompile.runtime.load.tensor_io import order_inputs
from tpcompile.runtime.transport.distributed import BACKENDS, choose_backend

REPO = Path(__file__).resolve().parents[1]
TP = 2
IN_FEATURES, OUT_FEATURES = 4, 3
SUBPROCESS_TIMEOUT_S = 180


class _ShardedLinear(nn.Module):
    """Row-parallel linear: each rank holds a slice of ``w``; outputs are all-reduced."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(IN_FEATURES, OUT_FEATURES))
        self.register_buffer("scale", torch.empty(OUT_FEATURES), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.w) * self.scale
        y = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(y, "sum", "tp"))
        # A factory op: export bakes device=meta into the graph; the runtime must rewrite it.
        return y + torch.zeros(OUT_FEATURES, device=x.device)


def _rank_weights(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234 + rank)
    return {
        "w": torch.randn(IN_FEATURES, OUT_FEATURES, generator=gen),
        "scale": torch.rand(OUT_FEATURES, generator=gen) + 0.5,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_artifact(root: Path) -> Path:
    with torch.device("meta"):
        model = _ShardedLinear()
    batch = torch.export.Dim("batch", min=1, max=64)
    example = (torch.empty(2, IN_FEATURES, device="meta"),)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    ranks = []
    for rank in range(TP):
        rank_dir = root / f"rank{rank}"
        rank_dir.mkdir(parents=True)
        torch.export.save(program, str(rank_dir / "program.pt2"))
        save_file(_rank_weights(rank), str(rank_dir / "weights.safetensors"))
        files = {name: _sha256(rank_dir / name) for name in ("program.pt2", "weights.safetensors")}
        ranks.append({"rank": rank, "dir": f"rank{rank}", "weight_bytes": 0, "files": files})
    manifest = {
        "format_version": 1,
        "kind": "generic",
        "tp": TP,
        "group_name": "tp",
        "dtype": "float32",
        "tool": {"name": "tpcompile", "version": "0.1.0"},
        "torch_version": torch.__version__,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["s0", IN_FEATURES]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["s0", OUT_FEATURES]}],
        "parameters": [],
        "collectives": [],
        "some_future_field": {"ignored": True},
        "ranks": ranks,
    }
    write_manifest(root, manifest)
    return root


def _expected(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], OUT_FEATURES)
    for rank in range(TP):
        w = _rank_weights(rank)
        out += (x @ w["w"]) * w["scale"]
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture
def artifact_copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "artifact"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _tprun(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpcompile.runtime.cli", *map(str, args)],
        env=env if env is not None else _env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def _write_inputs(path: Path, x: torch.Tensor) -> Path:
    save_file({"x": x}, str(path))
    return path


# --------------------------------------------------------------------------- end to end


def test_tprun_two_gloo_ranks_all_reduce(artifact: Path, tmp_path: Path) -> None:
    x = torch.randn(5, IN_FEATURES)
    inputs = _write_inputs(tmp_path / "in.safetensors", x)
    out = tmp_path / "out.safetensors"
    proc = _tprun(artifact, "--inputs", inputs, "-o", out, "--backend", "gloo", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr
    result = load_file(str(out))
    assert list(result) == ["y"]
    torch.testing.assert_close(result["y"], _expected(x))


def test_tprun_flipped_byte_reports_corrupt_rank(artifact_copy: Path, tmp_path: Path) -> None:
    weights = artifact_copy / "rank1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    inputs = _write_inputs(tmp_path / "in.safetensors", torch.randn(2, IN_FEATURES))
    proc = _tprun(artifact_copy, "--inputs", inputs, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2, proc.stderr
    # checked by the launcher before any rank is spawned: one line
    assert proc.stderr == "tprun: error: artifact corrupt: rank1/weights.safetensors\n"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_tprun_missing_manifest(tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in.safetensors", torch.randn(2, IN_FEATURES))
    empty = tmp_path / "not_an_artifact"
    empty.mkdir()
    proc = _tprun(empty, "--inputs", inputs, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2
    assert f"tprun: error: no manifest.json in {empty}: not a tpcompile artifact" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tprun_wrong_input_name_lists_expected(artifact: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in.safetensors"
    save_file({"idx": torch.randn(2, IN_FEATURES)}, str(inputs))
    proc = _tprun(artifact, "--inputs", inputs, "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2
    assert "missing input(s) x; the artifact expects: x" in proc.stderr


def test_worker_rejects_world_size_mismatch(artifact: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in.safetensors", torch.randn(2, IN_FEATURES))
    env = _env() | {
        "RANK": "0",
        "WORLD_SIZE": "3",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpcompile.runtime.launch.worker",
            WorkerArgs(artifact=artifact, inputs=inputs, output=Path("x")).to_json(),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 2
    assert "tprun: error: artifact was compiled for tp=2 but WORLD_SIZE=3" in proc.stderr


def test_run_artifact_api(artifact: Path) -> None:
    x = torch.randn(3, IN_FEATURES)
    out = run_artifact(artifact, {"x": x}, backend="gloo", timeout_s=60, env=_env())
    assert list(out) == ["y"]
    torch.testing.assert_close(out["y"], _expected(x))


# --------------------------------------------------------------------------- manifest


def test_manifest_fields(artifact: Path) -> None:
    manifest = load_artifact_manifest(artifact)
    assert manifest.tp == TP
    assert manifest.group_name == "tp"
    assert manifest.input_names == ["x"]
    assert manifest.inputs[0].shape == ("s0", IN_FEATURES)
    assert manifest.output_names == ["y"]
    assert [r.dir for r in manifest.ranks] == ["rank0", "rank1"]
    assert manifest.tool_version == "0.1.0"


def test_manifest_newer_format_version(artifact_copy: Path) -> None:
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(
        ManifestError,
        match=r"manifest format version 7 is newer than this runtime supports \(1\); upgrade tpcompile",
    ):
        load_artifact_manifest(artifact_copy)


def test_manifest_bad_json(artifact_copy: Path) -> None:
    (artifact_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        load_artifact_manifest(artifact_copy)


def test_manifest_missing_rank_dir(artifact_copy: Path) -> None:
    shutil.rmtree(artifact_copy / "rank1")
    with pytest.raises(ManifestError, match=f"rank directory {artifact_copy / 'rank1'} is missing"):
        load_artifact_manifest(artifact_copy)


def test_manifest_missing_field(artifact_copy: Path) -> None:
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["group_name"]
    write_manifest(artifact_copy, data)
    with pytest.raises(ManifestError, match="missing field 'group_name'"):
        load_artifact_manifest(artifact_copy)


def test_verify_rank_files(artifact_copy: Path) -> None:
    manifest = load_artifact_manifest(artifact_copy)
    verify_rank_files(artifact_copy, manifest.rank_entry(0))
    program = artifact_copy / "rank0" / "program.pt2"
    program.write_bytes(program.read_bytes() + b"\0")
    with pytest.raises(ArtifactCorrupt, match="^artifact corrupt: rank0/program.pt2$"):
        verify_rank_files(artifact_copy, manifest.rank_entry(0))


# --------------------------------------------------------------------------- loader (single process)


def _device_constants(module: nn.Module) -> list[torch.device]:
    return [
        value
        for gm in module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for node in gm.graph.nodes
        for value in (*node.args, *node.kwargs.values())
        if isinstance(value, torch.device)
    ]


@pytest.mark.device_generic
def test_load_rank_assigns_weights_and_rewrites_devices(artifact: Path, device: torch.device) -> None:
    """The program was exported on the meta device (its ``zeros`` says ``device=meta``): loaded onto the run
    device, weights and that constant are on it; rewriting again for another device (a ``cuda:1``
    constant needs no GPU) moves the constant there."""
    from tpcompile.runtime.load.graph_rewrite import rewrite_devices

    program = load_rank(artifact, 1, device)
    module = program.module
    expected = _rank_weights(1)
    assert isinstance(module.get_parameter("w"), nn.Parameter)
    assert not module.get_parameter("w").requires_grad
    assert module.get_parameter("w").device.type == module.get_buffer("scale").device.type == device.type
    torch.testing.assert_close(module.get_parameter("w").data.cpu(), expected["w"])
    torch.testing.assert_close(module.get_buffer("scale").cpu(), expected["scale"])
    assert "scale" not in module.state_dict()  # stays non-persistent
    assert _device_constants(module) == [program.device]
    other = torch.device("cuda", 1) if device.type == "cpu" else torch.device("cpu")
    assert rewrite_devices(module, other) == 1 and _device_constants(module) == [other]
    # No process group here: collectives stay bound to the manifest name.
    assert program.group_name == "tp"
    assert program.bind_group("custom") == 1


def test_load_rank_missing_weight(artifact_copy: Path) -> None:
    weights = artifact_copy / "rank0" / "weights.safetensors"
    save_file({"w": _rank_weights(0)["w"]}, str(weights))
    with pytest.raises(ArtifactLoadError, match="^weights for scale missing in rank0/weights.safetensors$"):
        load_rank(artifact_copy, 0, verify=False)


def test_load_rank_unknown_weight(artifact_copy: Path) -> None:
    weights = artifact_copy / "rank0" / "weights.safetensors"
    save_file({**_rank_weights(0), "bogus.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ArtifactLoadError, match="'bogus.weight' that the program does not define"):
        load_rank(artifact_copy, 0, verify=False)


def test_load_rank_wrong_shape(artifact_copy: Path) -> None:
    weights = artifact_copy / "rank0" / "weights.safetensors"
    save_file({**_rank_weights(0), "w": torch.zeros(2, 2)}, str(weights))
    with pytest.raises(ArtifactLoadError, match="weights for w in rank0/weights.safetensors have shape"):
        load_rank(artifact_copy, 0, verify=False)


# --------------------------------------------------------------------------- inputs, args, backend


def test_order_inputs_validation(artifact: Path) -> None:
    specs = load_artifact_manifest(artifact).inputs
    x = torch.randn(2, IN_FEATURES)
    assert order_inputs(specs, {"x": x})[0] is x
    with pytest.raises(InputError, match="missing input"):
        order_inputs(specs, {})
    with pytest.raises(InputError, match="unexpected input"):
        order_inputs(specs, {"x": x, "z": x})
    with pytest.raises(InputError, match="has dtype int64 but the artifact expects float32"):
        order_inputs(specs, {"x": x.long()})
    with pytest.raises(InputError, match="dim 1 must be 4"):
        order_inputs(specs, {"x": torch.randn(2, 5)})
    ranges = {"s0": SymbolRange(1, 64)}
    assert order_inputs(specs, {"x": torch.randn(64, 4)}, ranges)[0].shape == (64, 4)
    with pytest.raises(InputError, match=r"^input 'x' dim 0 is 65 but the artifact was compiled for 1 to 64"):
        order_inputs(specs, {"x": torch.randn(65, 4)}, ranges)


def test_worker_args_round_trip(tmp_path: Path) -> None:
    args = WorkerArgs(
        artifact=tmp_path / "a",
        inputs=tmp_path / "i.safetensors",
        output=tmp_path / "o.safetensors",
        backend="gloo",
        device="cpu",
        skip_verify=True,
        timeout_s=12.5,
        debug=True,
    )
    assert WorkerArgs.from_json(args.to_json()) == args
    plain = WorkerArgs(artifact=tmp_path, inputs=tmp_path / "i", output=tmp_path / "o")
    assert WorkerArgs.from_json(plain.to_json()) == plain
    generation = GenerationArgs(
        prompts=("a", "b"),
        prompt_file=tmp_path / "p.txt",
        prompt_ids=((1, 2), (3,)),
        read_stdin=True,
        max_new_tokens=7,
        sampling=SamplingConfig(temperature=0.5, top_k=3, top_p=0.9, seed=4),
        chat_template=False,
        save_tokens=tmp_path / "t.json",
        results_json=tmp_path / "r.json",
        stream=False,
        compile_decode=True,
    )
    generating = WorkerArgs(artifact=tmp_path, generation=generation, trust_pickle=True)
    assert WorkerArgs.from_json(generating.to_json()) == generating
    relative = WorkerArgs(artifact=Path("a"), inputs=Path("i"), output=Path("o"))
    assert WorkerArgs.from_json(relative.to_json()).artifact == Path("a").resolve()  # paths made absolute
    with pytest.raises(InputError, match="invalid worker arguments: WorkerArgs has no field"):
        WorkerArgs.from_json('{"artifact": "/a", "bogus": 1}')


def test_choose_backend_cpu_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BACKENDS == BACKEND_CHOICES
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend(2) == ("gloo", torch.device("cpu"))
    assert choose_backend(2, "gloo", "cpu") == ("gloo", torch.device("cpu"))
    from tpcompile.runtime.errors import BackendError

    with pytest.raises(BackendError, match="CUDA was requested but is not available"):
        choose_backend(2, "nccl")
    with pytest.raises(BackendError, match="nccl cannot run on device cpu"):
        choose_backend(2, "nccl", "cpu")


def test_an_error_every_rank_hits_is_printed_once(artifact_copy: Path, tmp_path: Path) -> None:
    """Unchecked (--skip-verify) truncated weights fail in every rank: the launcher's line names the rank
    that failed first and its error; the ranks' own copies of it are not printed as well."""
    for rank in range(TP):
        weights = artifact_copy / f"rank{rank}" / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:20])
    inputs = _write_inputs(tmp_path / "in.safetensors", torch.randn(2, IN_FEATURES))
    proc = _tprun(artifact_copy, "--inputs", inputs, "-o", tmp_path / "out.safetensors", "--skip-verify")
    assert proc.returncode == 2
    assert re.fullmatch(
        r"tprun: error: rank ([01]) failed \(exit 2\): cannot read rank\1/weights\.safetensors: [^\n]+\n",
        proc.stderr,
    ), proc.stderr
