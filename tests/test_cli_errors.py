"""Bad input: one-line errors with exit code 2, and nothing written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples import gpt
from tests.conftest import REPO, cli_env, tpcompile, tprun
from tpcompile import errors
from tpcompile.runtime import reporting
from tpcompile.runtime.errors import ArtifactCorrupt, Terminated


def _error_line(proc) -> str:  # type: ignore[no-untyped-def]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("[tpcompile] ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_pickle_needs_trust_flag(tmp_path: Path) -> None:
    model = gpt.build_model(gpt.GPTConfig(n_layer=1))
    path = tmp_path / "model.pt"
    torch.save((model, gpt.example_inputs()), path)
    proc = tpcompile(path, "--tp", "2", "-o", tmp_path / "out")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert line.startswith("tpcompile: error: ")
    assert "unpickling runs arbitrary code" in line and "--trust-pickle" in line
    assert not (tmp_path / "out").exists()
    ok = tpcompile(path, "--tp", "2", "-o", tmp_path / "out", "--trust-pickle", "--quiet")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_missing_file(tmp_path: Path) -> None:
    proc = tpcompile(tmp_path / "nope.pt2", "--tp", "2", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert _error_line(proc) == f"tpcompile: error: model file {tmp_path / 'nope.pt2'} does not exist"


def test_tp_below_one(gpt_pt2: Path, tmp_path: Path) -> None:
    proc = tpcompile(gpt_pt2, "--tp", "0", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert _error_line(proc) == "tpcompile: error: --tp must be at least 1 (got 0)"
    assert not (tmp_path / "out").exists()


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    proc = tpcompile(path, "--tp", "2", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert _error_line(proc).startswith(f"tpcompile: error: unknown model format: {path} (expected ")


def test_pt_that_is_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"hello")
    proc = tpcompile(path, "--tp", "2", "-o", tmp_path / "out")
    assert proc.returncode == 2
    assert "unknown model format" in _error_line(proc)


def test_existing_output_needs_force(gpt_pt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", out)
    assert proc.returncode == 2
    assert "already exists; pass --force" in _error_line(proc)
    assert (out / "keep.txt").read_text() == "user data"


def test_bad_plan_file(gpt_pt2: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"*.q.weight": "diagonal"}')
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", tmp_path / "out", "--plan", plan)
    assert proc.returncode == 2
    assert "has style 'diagonal'; use one of colwise, rowwise, replicate" in _error_line(proc)


def _exit_code_table() -> dict[int, tuple[str, str]]:
    """README "Exit codes": code -> (tpcompile meaning, tprun meaning)."""
    section = (REPO / "README.md").read_text().split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], cells[2])
    return rows


def test_readme_exit_codes_match_the_code(capsys) -> None:  # type: ignore[no-untyped-def]
    rows = _exit_code_table()
    compile_codes = {
        errors.EXIT_OK: "compiled",
        errors.EXIT_INTERNAL: "internal error",
        errors.EXIT_USAGE: "usage error",
        errors.EXIT_UNSUPPORTED: "unsupported model",
        errors.EXIT_INTERRUPTED: "interrupted",
        errors.EXIT_TERMINATED: "terminated",
    }
    run_codes = {
        reporting.EXIT_OK: "every rank finished",
        reporting.EXIT_FAILURE: "internal error",
        reporting.EXIT_USER_ERROR: "bad input",
        reporting.EXIT_INTERRUPTED: "interrupted",
        reporting.EXIT_TERMINATED: "terminated",
    }
    assert {code for code, (text, _) in rows.items() if text != "-"} == set(compile_codes)
    assert {code for code, (_, text) in rows.items() if text != "-"} == set(run_codes)
    for code, meaning in compile_codes.items():
        assert rows[code][0].startswith(meaning), (code, rows[code][0])
    for code, meaning in run_codes.items():
        assert rows[code][1].startswith(meaning), (code, rows[code][1])
    # the codes the typed errors and the runtime's reporting actually return
    assert errors.UsageError("x").exit_code == errors.EXIT_USAGE
    assert errors.UnsupportedModelError("x").exit_code == errors.EXIT_UNSUPPORTED
    assert (
        errors.VerificationError("x").exit_code
        == errors.TpCompileError("x").exit_code
        == errors.EXIT_INTERNAL
    )
    assert reporting.report_exception(ArtifactCorrupt("artifact corrupt: f")) == reporting.EXIT_USER_ERROR
    assert reporting.report_exception(RuntimeError("boom")) == reporting.EXIT_FAILURE
    assert reporting.report_exception(KeyboardInterrupt()) == reporting.EXIT_INTERRUPTED
    assert reporting.report_exception(Terminated()) == reporting.EXIT_TERMINATED
    assert capsys.readouterr().err.splitlines()[0] == "tprun: error: artifact corrupt: f"


def test_input_outside_a_dynamic_dims_range_is_refused_before_any_rank_starts(
    gpt_pt2: Path, tmp_path: Path
) -> None:
    """The example GPT is exported with its sequence length in [2, 64]; the manifest records that range
    and ``tprun`` checks inputs against it in the launcher (a rank would fail deep inside torch)."""
    out = tmp_path / "out"
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (symbol,) = manifest["symbols"]
    assert manifest["symbols"] == {symbol: {"min": 2, "max": 64}}
    assert manifest["inputs"][0]["shape"] == [1, symbol]
    inputs, result = tmp_path / "in.safetensors", tmp_path / "result.safetensors"
    for seq in (100, 1):
        save_file({"idx": torch.zeros(1, seq, dtype=torch.long)}, str(inputs))
        proc = tprun(out, "--inputs", inputs, "-o", result)
        assert (proc.returncode, proc.stderr) == (
            2,
            f"tprun: error: input 'idx' dim 1 is {seq} but the artifact was compiled for 2 to 64 there "
            f"(symbol {symbol})\n",
        )
        assert not result.exists()
    save_file({"idx": torch.zeros(1, 64, dtype=torch.long)}, str(inputs))
    proc = tprun(out, "--inputs", inputs, "-o", result)
    assert proc.returncode == 0, proc.stderr  # the largest length in range runs


def test_plan_patterns_that_decide_no_parameter_are_named(gpt_pt2: Path, tmp_path: Path) -> None:
    """A typo in a --plan pattern (or a pattern an earlier one shadows) is a warning, or with
    --strict-plan an error before anything is written."""
    plan = tmp_path / "plan.json"
    rules = {"*.mlp.fcx.weight": "replicate", "blocks.*.mlp.fc.weight": "replicate", "*.fc.weight": "colwise"}
    plan.write_text(json.dumps(rules))
    out = tmp_path / "out"
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", out, "--plan", plan, "--strict-plan", "--quiet")
    assert (proc.returncode, proc.stderr) == (
        2,
        f"tpcompile: error: plan file {plan}: pattern '*.mlp.fcx.weight' matches no parameter (and 1 more); "
        "fix the plan or drop --strict-plan\n",
    )
    assert not out.exists()
    proc = tpcompile(gpt_pt2, "--tp", "2", "-o", out, "--plan", plan, "--quiet")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("tpcompile: warning: ")]
    ignored = "it is ignored (--strict-plan makes this an error)"
    assert warnings == [
        f"tpcompile: warning: plan file {plan}: pattern {pattern}; {ignored}"
        for pattern in (
            "'*.mlp.fcx.weight' matches no parameter",
            "'*.fc.weight' only matches parameters an earlier pattern decides",
        )
    ]
    placements = {p["name"]: p["plan"] for p in json.loads((out / "manifest.json").read_text())["parameters"]}
    assert placements["blocks.0.mlp.fc.weight"] == placements["blocks.1.mlp.fc.weight"] == "replicate"


def test_more_ranks_than_heads_is_a_warning_naming_how_many_ranks_hold_them(tmp_path: Path) -> None:
    """tp=64 for 2 heads: the MLP still gives every rank one column, the heads fit 2 ranks at most, which
    the warning says (instead of a note per weight); the compile captures 64 small programs."""
    out = tmp_path / "out"
    proc = tpcompile("tests.factories:two_heads_wide_mlp", "--tp", "64", "-o", out, "--quiet")
    warning = (
        "only 2 of the 64 ranks can hold a share of k.weight (and 3 more weights): at tp=64 they are "
        "replicated on every rank; tp <= 2 splits them"
    )
    assert (proc.returncode, proc.stderr) == (0, f"tpcompile: warning: {warning}\n")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["warnings"] == [warning]
    plans = {p["name"]: (p["plan"], p["placement"]) for p in manifest["parameters"]}
    assert plans["fc.weight"] == ("colwise", f"S(0;{','.join(['1'] * 64)})")
    assert plans["q.weight"] == ("replicate", "R")
    expected = ["manifest.json", *(f"rank{r}" for r in range(64))]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)


def test_more_ranks_than_any_weight_splits_over_is_refused(tmp_path: Path) -> None:
    """The example GPT's widest weight (the MLP, 384 columns) fits 384 ranks: beyond, no rank holds work."""
    out = tmp_path / "out"
    proc = tpcompile("examples.gpt:build", "--tp", "400", "-o", out, "--quiet")
    assert (proc.returncode, proc.stderr) == (
        2,
        "tpcompile: error: --tp 400 is more ranks than any weight of the model can be split over: at most "
        "384 ranks can hold work (blocks.0.mlp.fc.weight, in 384 whole units); use --tp 384 or less\n",
    )
    assert not out.exists()


_SMALL_DISK = (
    'mount -t tmpfs -o size=100k tmpfs "$1" || exit 97; disk=$1; shift; "$@"; rc=$?; ls -A "$disk"; exit $rc'
)


def _can_mount_a_small_disk() -> bool:
    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_disk(), reason="needs unshare -rm (user and mount namespaces)")
def test_full_disk_is_an_environment_error_naming_the_path_and_leaving_nothing(tmp_path: Path) -> None:
    """A real full disk: a 100 KiB tmpfs (in a private mount namespace) cannot hold the example GPT's 1.1 MiB
    of tp=2 weights. The listing printed after the compile, inside the namespace, shows what was left. The
    compile fails while its capture worker is starting: that one prints nothing either."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    compile_cmd = [
        sys.executable,
        "-m",
        "tpcompile.cli",
        "examples.gpt:build",
        "--tp",
        "2",
        "-o",
        out,
        "--quiet",
    ]
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", _SMALL_DISK, "sh", disk, *map(str, compile_cmd)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(
        f"tpcompile: error: no space left on device writing {re.escape(str(out))} "
        r"\(rank[01]/(weights\.safetensors|program\.pt2)\); nothing was left behind\n",
        proc.stderr,
    ), proc.stderr
    assert proc.stdout == ""  # the listing of the full disk after the compile: empty
    assert [pid for pid in _pids_mentioning(str(disk))] == []  # no worker survived


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
