"""Shared helpers: run the CLIs as real subprocesses, build the example model."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.forkserver import ForkServer

REPO = Path(__file__).resolve().parents[1]
# Native programs (AOTInductor) take 10-60 s per rank to compile: every `tpcompile` the suite starts
# compiles eager programs only, unless a test asks for native ones with --native (tests/test_native.py).
os.environ["TPCOMPILE_NATIVE"] = "0"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run(
    module: str, *args: str | Path, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=cli_env(), cwd=cwd or REPO, timeout=timeout
    )


def run_code(code: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` in a fresh interpreter (what a test of imports needs), from the repo."""
    cmd = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=timeout)


def write_manifest(art: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as ``art/manifest.json`` with its digest, as tpcompile writes it (a hand-built or
    edited manifest that the runtime verifies)."""
    from tpcompile.runtime.format import MANIFEST_DIGEST_FIELD, manifest_digest

    data = {k: v for k, v in data.items() if k != MANIFEST_DIGEST_FIELD}
    data[MANIFEST_DIGEST_FIELD] = manifest_digest(data)
    (art / "manifest.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


_fork_server: ForkServer | None = None


def tpcompile(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m tpcompile.cli ARGS``, forked from this worker's fork server (tests/forkserver.py: ~5 s
    of imports less a command) where it runs, else as a plain subprocess."""
    global _fork_server
    if _fork_server is None:
        _fork_server = ForkServer(cli_env(), REPO)
        atexit.register(_fork_server.close)
    if not _fork_server.usable:
        return run("tpcompile.cli", *args, cwd=cwd)
    return _fork_server.run("tpcompile.cli", [str(a) for a in args], cli_env(), cwd or REPO, timeout=600)


def fork_server_in_use() -> bool:
    """Whether :func:`tpcompile` forks its commands (else they run as plain subprocesses)."""
    return _fork_server is not None and _fork_server.usable


def tprun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run("tpcompile.runtime.cli", *args)


@pytest.fixture(scope="session")
def gpt_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example GPT (6 heads), exported with a dynamic sequence length and saved with torch.export.save."""
    from examples import gpt

    path = tmp_path_factory.mktemp("gpt") / "gpt.pt2"
    gpt.export(path=str(path))
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the tests marked device_generic (cpu or cuda; examples/gpu_check.py passes cuda)",
    )


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The run device of a ``device_generic`` test: ``--device`` (cpu in the normal suite)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch runs one intra-op thread, as a rank per core does (the CPU decode kernel needs that)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_model() -> Any:
    """transformers' SmolLM2 (the GGUF dequantized to fp32), loaded once for the session (~1 min)."""
    from tests.checkpoints import smollm2_transformers

    return smollm2_transformers()


SMOLLM2_SEQ_LEN = 128  # the test prompt (36 tokens) + 64 new ones fit


@pytest.fixture(scope="session")
def shared_tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every worker of this run sees: under ``pytest -n`` each worker's base temporary
    directory is a child of the run's (``popen-gw0``, ...), so their parent is shared; without xdist it
    is the session's own. Whatever is built there is built under a :class:`filelock.FileLock` (the other
    worker waits for it instead of building it a second time)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def compiled_smollm2(shared_tmp_path: Path) -> Callable[[int], Path]:
    """``compiled_smollm2(tp)``: SmolLM2 compiled once per tp for the whole run, by whichever worker asks
    first (KV cache 128). Tests only read these artifacts (one that edits an artifact copies it first)."""
    from filelock import FileLock

    from tests.checkpoints import smollm2_gguf

    root = shared_tmp_path / "smollm2"
    root.mkdir(exist_ok=True)

    def get(tp: int) -> Path:
        out = root / f"tp{tp}"
        with FileLock(root / f"tp{tp}.lock"):
            if not (out / "manifest.json").exists():  # a compile writes its manifest last
                args = ("--tp", str(tp), "-o", out, "--max-seq-len", str(SMOLLM2_SEQ_LEN), "--quiet")
                proc = tpcompile(smollm2_gguf(), *args)
                assert proc.returncode == 0, proc.stderr
        return out

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding real-model (``slow``) tests run first. ``make test`` runs two workers that each take
    whole modules in this order (``-n 2 --dist loadfile --no-loadscope-reorder``): started first, the
    longest modules end about together with the many short ones the other worker takes meanwhile, rather
    than last on one worker while the other idles."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each module keeps its own order
