"""Trustworthy artifacts: corruption of every kind of file, interrupted compiles, bad manifests, program
archives that would unpickle (on a tiny random-weight Llama compiled at tp=2, and the example GPT), and the
CI stage in examples/ci."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import save_smollm2_tokenizer, tiny_checkpoint
from tests.conftest import REPO, cli_env, run, tpcompile, tprun, write_manifest
from tpcompile.runtime import load_rank
from tpcompile.runtime.errors import ArtifactCorrupt, ManifestCorrupt, ManifestError
from tpcompile.runtime.format import load_artifact_manifest, sha256_file, verify_artifact
from tpcompile.runtime.load.program_archive import unsafe_content

KINDS = ["manifest.json", "rank1/program.pt2", "rank0/weights.safetensors", "tokenizer/tokenizer.json"]


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    checkpoint = tiny_checkpoint("llama", root / "llama", save_smollm2_tokenizer(root / "tokenizer"))
    out = root / "llama-tp2"
    proc = tpcompile(checkpoint, "--tp", "2", "-o", out, "--max-seq-len", "32", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(art: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(art, tmp_path / "art"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_offset(art: Path, rel: str) -> int:
    if rel == "manifest.json":
        # a hex digit of a recorded file hash: still valid JSON, so only the manifest's own digest notices
        text = (art / rel).read_text()
        return text.index('"program.pt2": "') + len('"program.pt2": "') + 10
    return (art / rel).stat().st_size // 2


def _prompt(art: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    saved = tmp_path / "tokens.json"
    return tprun(art, "--prompt", "hi", "--max-new-tokens", "2", "--save-tokens", saved, *extra)


def _files(art: Path) -> dict[str, str]:
    return {p.relative_to(art).as_posix(): sha256_file(p) for p in sorted(art.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("rel", KINDS)
def test_flipped_byte_is_reported_and_nothing_runs(lm_artifact: Path, tmp_path: Path, rel: str) -> None:
    art = _copy(lm_artifact, tmp_path)
    _flip(art / rel, _flip_offset(art, rel))
    proc = _prompt(art, tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, f"tprun: error: artifact corrupt: {rel}\n", "")
    assert not (tmp_path / "tokens.json").exists()


_LAUNCHER_WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("the launcher imported " + name)

sys.meta_path.insert(0, NoTorch())
sys.argv = ["tprun", *sys.argv[1:]]
runpy.run_module("tpcompile.runtime.cli", run_name="__main__")
"""


def test_the_launcher_checks_and_starts_the_ranks_without_importing_torch(
    lm_artifact: Path, tmp_path: Path
) -> None:
    """tprun's own process verifies the files (hashes, program trust, prompts) and spawns the ranks without
    torch (~2 s of every start-up); only the ranks load it. Here torch cannot be imported by the launcher
    at all, and the answer is the same as a normal run's."""
    normal = _prompt(lm_artifact, tmp_path)
    assert normal.returncode == 0, normal.stderr
    want = json.loads((tmp_path / "tokens.json").read_text())
    saved = tmp_path / "without-torch.json"
    args = [str(lm_artifact), "--prompt", "hi", "--max-new-tokens", "2", "--save-tokens", str(saved)]
    cmd = [sys.executable, "-c", _LAUNCHER_WITHOUT_TORCH, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(saved.read_text()) == want


def test_manifest_that_is_not_json(lm_artifact: Path, tmp_path: Path) -> None:
    art = _copy(lm_artifact, tmp_path)
    _flip(art / "manifest.json", 0)  # "{" -> "z"
    proc = _prompt(art, tmp_path)
    message = "tprun: error: artifact corrupt: manifest.json is not valid JSON (line 1: Expecting value)\n"
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, "")


def test_manifest_digest_checked_unless_verification_is_skipped(lm_artifact: Path, tmp_path: Path) -> None:
    art = _copy(lm_artifact, tmp_path)
    verify_artifact(load_artifact_manifest(art))
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    data["extra"]["lm"]["eos_token_ids"] = [7]
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(ManifestCorrupt, match=r"^artifact corrupt: manifest\.json$"):
        load_artifact_manifest(art)
    assert load_artifact_manifest(art, verify=False).lm.eos_token_ids == (7,)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- bad manifests (CLI)


def test_newer_format_version_and_traceback_with_debug(lm_artifact: Path, tmp_path: Path) -> None:
    art = _copy(lm_artifact, tmp_path)
    path = art / "manifest.json"
    path.write_text(path.read_text().replace('"format_version": 1', '"format_version": 2'))
    message = (
        "tprun: error: manifest format version 2 is newer than this runtime supports (1); upgrade tpcompile"
    )
    proc = _prompt(art, tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message + "\n", "")
    proc = _prompt(art, tmp_path, "--debug")
    assert proc.returncode == 2
    assert proc.stderr.startswith("Traceback (most recent call last):\n")
    assert "ManifestError" in proc.stderr and proc.stderr.splitlines()[-1] == message


def test_missing_rank_directory(lm_artifact: Path, tmp_path: Path) -> None:
    art = _copy(lm_artifact, tmp_path)
    shutil.rmtree(art / "rank1")
    proc = _prompt(art, tmp_path)
    assert (proc.returncode, proc.stderr) == (2, f"tprun: error: rank directory {art / 'rank1'} is missing\n")


# --------------------------------------------------------------------------- what a manifest may name


def _edit(art: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """A hostile but self-consistent manifest: edited, then given its digest again."""
    data = json.loads((art / "manifest.json").read_text())
    edit(data)
    write_manifest(art, data)


def _run(art: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``tprun`` with a short timeout: a reader that opened the FIFO below would hang until then."""
    saved = tmp_path / "tokens.json"
    args = ("--prompt", "hi", "--max-new-tokens", "2", "--save-tokens", saved, *extra)
    return run("tpcompile.runtime.cli", art, *args, timeout=120)


def _swap_for_link(path: Path, target: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def _outside(where: str, rel: str) -> str:
    return (
        f"tprun: error: artifact corrupt: manifest.json: {where} names {rel!r}, which is not a plain "
        "relative path inside the artifact\n"
    )


def _climbs_out(art: Path, fifo: Path) -> str:
    _edit(art, lambda m: m["ranks"][0]["files"].update({"../../fifo": "0" * 64}))
    return _outside("ranks[0].files", "../../fifo")


def _absolute(art: Path, fifo: Path) -> str:
    _edit(art, lambda m: m["ranks"][1]["files"].update({str(fifo): "0" * 64}))
    return _outside("ranks[1].files", str(fifo))


def _not_plain(art: Path, fifo: Path) -> str:
    _edit(art, lambda m: m["ranks"][0].update(dir="./rank0"))
    return _outside("ranks[0].dir", "./rank0")


def _shared_file(art: Path, fifo: Path) -> str:
    _edit(art, lambda m: m["shared_files"].update({"tokenizer/../../fifo": "0" * 64}))
    return _outside("shared_files", "tokenizer/../../fifo")


def _link_out(art: Path, fifo: Path) -> str:
    """The manifest is the compiler's; the file it names is now a symlink leading out."""
    _swap_for_link(art / "rank1" / "weights.safetensors", fifo)
    return _outside("ranks[1].files", "weights.safetensors")


def _linked_tokenizer(art: Path, fifo: Path) -> str:
    """The tokenizer directory leads out (its files listed, they would be refused first: not listed)."""
    _swap_for_link(art / "tokenizer", fifo.parent)
    _edit(art, lambda m: m.update(shared_files={}))
    return _outside("extra.lm.tokenizer", "tokenizer")


@pytest.mark.parametrize("skip_verify", [False, True], ids=["verified", "skip-verify"])
@pytest.mark.parametrize(
    "tamper", [_climbs_out, _absolute, _not_plain, _shared_file, _link_out, _linked_tokenizer]
)
def test_paths_outside_the_artifact_are_refused_before_anything_is_opened(
    lm_artifact: Path, tmp_path: Path, tamper: Callable[[Path, Path], str], skip_verify: bool
) -> None:
    """Every path a manifest names must stay inside OUT once symlinks are resolved. The paths lead to a
    FIFO without a writer: opening it (to hash or load it) would block, so a refusal that comes back
    proves nothing was opened. Path checks hold with ``--skip-verify`` too (only hashing is skipped)."""
    art = _copy(lm_artifact, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    message = tamper(art, fifo)
    proc = _run(art, tmp_path, *(["--skip-verify"] if skip_verify else []))
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, "")
    assert not (tmp_path / "tokens.json").exists()


def test_a_listed_file_that_is_not_a_regular_file_is_never_opened(lm_artifact: Path, tmp_path: Path) -> None:
    art = _copy(lm_artifact, tmp_path)
    (art / "rank0" / "weights.safetensors").unlink()
    os.mkfifo(art / "rank0" / "weights.safetensors")
    proc = _run(art, tmp_path)
    message = "tprun: error: artifact corrupt: rank0/weights.safetensors is not a regular file\n"
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, "")


# --------------------------------------------------------------------------- a check the artifact cannot skip


def test_manifest_without_digest_or_file_entries_runs_only_with_skip_verify(
    lm_artifact: Path, tmp_path: Path
) -> None:
    """Dropping the manifest's digest and every file entry does not turn verification off; the user's
    ``--skip-verify`` does."""
    art = _copy(lm_artifact, tmp_path)
    data = json.loads((art / "manifest.json").read_text())
    del data["manifest_sha256"]
    for rank in data["ranks"]:
        rank["files"] = {}
    data["shared_files"] = {}
    (art / "manifest.json").write_text(json.dumps(data))
    proc = _run(art, tmp_path)
    message = (
        "tprun: error: artifact corrupt: manifest.json has no manifest_sha256; recompile it (or run it "
        "unchecked with --skip-verify)\n"
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, "")
    proc = _run(art, tmp_path, "--skip-verify")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "tokens.json").read_text())[0]["new_ids"]  # it ran: unverified


def _unlist_rank_files(art: Path) -> str:
    _edit(art, lambda m: m["ranks"][0].update(files={}))
    return "rank0/program.pt2"


def _unlist_tokenizer_file(art: Path) -> str:
    _edit(art, lambda m: m["shared_files"].pop("tokenizer/tokenizer.json"))
    return "tokenizer/tokenizer.json"


def _add_unlisted_segment(art: Path) -> str:
    (art / "rank1" / "segment0.onnx").write_bytes(b"an ONNX segment nobody hashed")
    return "rank1/segment0.onnx"


@pytest.mark.parametrize("tamper", [_unlist_rank_files, _unlist_tokenizer_file, _add_unlisted_segment])
def test_every_file_the_runtime_reads_needs_an_entry(
    lm_artifact: Path, tmp_path: Path, tamper: Callable[[Path], str]
) -> None:
    """Programs, weights, tokenizer files, ONNX segments: a rank's directory and the tokenizer's hold only
    files the manifest lists with a hash."""
    art = _copy(lm_artifact, tmp_path)
    rel = tamper(art)
    proc = _run(art, tmp_path)
    message = f"tprun: error: artifact corrupt: {rel} is not listed in the manifest\n"
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, message, "")
    with pytest.raises(ArtifactCorrupt, match=f"^artifact corrupt: {rel} is not listed in the manifest$"):
        load_rank(art, int(rel[4]) if rel.startswith("rank") else 0)  # what a rank under torchrun runs


# --------------------------------------------------------------------------- pickles


def test_compiled_programs_hold_nothing_to_unpickle(lm_artifact: Path) -> None:
    for rank in (0, 1):
        path = lm_artifact / f"rank{rank}" / "program.pt2"
        assert unsafe_content(path) is None
        with zipfile.ZipFile(path) as archive:
            samples = [i for i in archive.infolist() if "/data/sample_inputs/" in i.filename]
        assert [i.file_size for i in samples] == [0]  # the example inputs torch would unpickle: dropped


class _Payload:
    """Unpickles by calling ``eval``: touches ``marker`` and returns valid example inputs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        torch_ = "__import__('torch')"
        inputs = f"(({torch_}.zeros(1, 2, dtype={torch_}.long), {torch_}.arange(2)), {{}})"
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).touch() or {inputs}",))


def _poison(program: Path, marker: Path, raw: bool = False) -> None:
    """Replace the archive's (empty) example inputs by a pickle that runs code when loaded: saved by
    ``torch.save``, or (``raw``) a plain protocol-4 pickle."""
    buf = io.BytesIO()
    if raw:
        pickle.dump(_Payload(marker), buf, protocol=4)
    else:
        torch.save(_Payload(marker), buf)
    with zipfile.ZipFile(program) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    samples = "data/sample_inputs/model.pt"
    entries = [(info, buf.getvalue() if info.filename.endswith(samples) else body) for info, body in entries]
    with zipfile.ZipFile(program, "w", zipfile.ZIP_STORED) as archive:
        for info, body in entries:
            archive.writestr(info, body)


UNTRUSTED_SAMPLES = (
    "tprun: error: rank0/program.pt2 contains pickled example inputs (data/sample_inputs/model.pt) that "
    "are not plain tensors, which runs code when loaded; pass --trust-pickle only if you trust where the "
    "artifact comes from (or recompile it with tpcompile)\n"
)


def test_program_that_unpickles_needs_trust_pickle(
    lm_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = _copy(lm_artifact, tmp_path)
    marker = tmp_path / "code-ran"
    _poison(art / "rank0" / "program.pt2", marker)
    proc = _prompt(art, tmp_path, "--skip-verify")  # hashes skipped: the trust check still applies
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, UNTRUSTED_SAMPLES, "")
    assert not marker.exists()
    # torch logs the fallback with a malformed format string, which pytest's log capture turns into an error
    monkeypatch.setattr(logging.getLogger("torch._export.serde.serialize"), "disabled", True)
    program = load_rank(art, 0, verify=False, trust_pickle=True)  # what --trust-pickle lets through
    assert marker.exists() and program.rank == 0


def test_refusing_a_plain_pickle_prints_nothing_but_the_refusal(lm_artifact: Path, tmp_path: Path) -> None:
    """torch's restricted unpickler warns about a protocol-4 pickle while refusing it; that warning is
    not the user's business: the refusal is the only line."""
    art = _copy(lm_artifact, tmp_path)
    marker = tmp_path / "code-ran"
    _poison(art / "rank0" / "program.pt2", marker, raw=True)
    proc = _prompt(art, tmp_path, "--skip-verify")
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, UNTRUSTED_SAMPLES, "")
    assert not marker.exists()


def test_tpcompile_refuses_a_pt2_that_unpickles(gpt_pt2: Path, tmp_path: Path) -> None:
    model = Path(shutil.copy(gpt_pt2, tmp_path / "gpt.pt2"))
    marker = tmp_path / "code-ran"
    _poison(model, marker)
    proc = tpcompile(model, "--tp", "2", "-o", tmp_path / "out", "--quiet")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"tpcompile: error: {model} contains pickled example inputs (data/sample_inputs/model.pt) that are "
        "not plain tensors; unpickling runs arbitrary code, so it is loaded only with --trust-pickle\n",
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- interrupted compiles


def _start_compile(out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tpcompile.cli", "examples.gpt:build", "--tp", "2", "-o", str(out)]
    return subprocess.Popen(
        [*cmd, "--quiet", *extra],
        env=cli_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill_once_writing(proc: subprocess.Popen[str], out: Path) -> Path | None:
    """SIGKILL the compile while its working directory beside ``out`` exists; return that directory.

    The compile is frozen (SIGSTOP) as soon as the directory is seen and killed only if it is still
    there, so the kill always lands mid-write; ``None`` if the compile renamed it first (or finished).
    """
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            work = list(out.parent.glob(f".{out.name}.tmp-{proc.pid}-*"))
            if work:
                proc.send_signal(signal.SIGSTOP)
                if not work[0].is_dir():
                    proc.send_signal(signal.SIGCONT)
                    return None
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
                return work[0]
            if proc.poll() is not None:
                _, err = proc.communicate()
                assert proc.returncode == 0, err
                return None
            time.sleep(0.005)
        pytest.fail("tpcompile did not create its working directory within 300 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its forked capture workers, if any are left
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _kill_while_writing(out: Path, *extra: str) -> Path:
    for _ in range(3):
        work = _kill_once_writing(_start_compile(out, *extra), out)
        if work is not None:
            return work
        if "--force" not in extra:
            shutil.rmtree(out)  # it finished: start over from an absent OUT
    pytest.fail("tpcompile finished three times before it could be killed while writing")


def test_killed_compile_leaves_nothing_or_the_previous_artifact(tmp_path: Path) -> None:
    out = tmp_path / "gpt"
    # 1. killed while writing a new OUT: no OUT; the working directory left behind never loads
    stale = _kill_while_writing(out)
    assert not out.exists() and stale.is_dir()
    with pytest.raises(ManifestError, match="is a working directory of an interrupted or running tpcompile"):
        load_artifact_manifest(stale)
    proc = tprun(stale, "--inputs", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors")
    assert proc.returncode == 2
    assert proc.stderr == (
        f"tprun: error: {stale} is a working directory of an interrupted or running tpcompile, not an "
        "artifact; use the compile's output directory\n"
    )
    # 2. the next compile is not disturbed by it, and removes it
    proc = tpcompile("examples.gpt:build", "--tp", "2", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]
    before = _files(out)
    # 3. killed while replacing OUT (--force): OUT is still the previous artifact, intact and loadable
    stale = _kill_while_writing(out, "--force")
    assert _files(out) == before
    verify_artifact(load_artifact_manifest(out))
    assert load_rank(out, 1).rank == 1
    assert stale.is_dir()


# --------------------------------------------------------------------------- CI stage


def _ci_stage(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = cli_env()
    env["TPCOMPILE"] = f"{sys.executable} -m tpcompile.cli"
    env["TPRUN"] = f"{sys.executable} -m tpcompile.runtime.cli"
    script = REPO / "examples" / "ci" / "compile_verify_upload.sh"
    return subprocess.run(
        ["bash", str(script), *map(str, args)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )


def test_ci_stage_compiles_verifies_and_uploads(tmp_path: Path) -> None:
    out, dest = tmp_path / "build" / "gpt-tp2", tmp_path / "dist"
    proc = _ci_stage("examples.gpt:build", "--tp", "2", "--out", out, "--dest", dest)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: max abs error ")  # tpcompile verify against the original model
    assert sorted(p.name for p in dest.iterdir()) == ["gpt-tp2", "gpt-tp2.json"]
    uploaded = dest / "gpt-tp2"
    summary = json.loads((dest / "gpt-tp2.json").read_text())
    assert _files(uploaded) == summary["files"] == _files(out)
    verify_artifact(load_artifact_manifest(uploaded))
    assert load_rank(uploaded, 1).rank == 1


def test_ci_stage_stops_at_the_first_failing_step(tmp_path: Path) -> None:
    dest = tmp_path / "dist"
    proc = _ci_stage(tmp_path / "nope.pt2", "--out", tmp_path / "build" / "x", "--dest", dest)
    assert proc.returncode == 2
    assert f"tpcompile: error: model file {tmp_path / 'nope.pt2'} does not exist" in proc.stderr
    assert not dest.exists()
