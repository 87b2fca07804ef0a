"""`tprun calibrate`: it writes measured hardware profiles the cost model reads; its errors are one line."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import tprun
from tpcompile.runtime.format.hardware import read_profile


def test_calibrate_writes_a_measured_profile(tmp_path: Path) -> None:
    proc = tprun("calibrate", "--tp", "1", "--out", tmp_path, "--weight-mib", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {tmp_path / 'host.toml'}"
    text = (tmp_path / "host.toml").read_text()
    assert text.startswith("# MEASURED by `tprun calibrate --tp 1` on ")
    profile = read_profile(tmp_path / "host.toml")
    assert profile.name == "host" and not profile.predicted
    assert set(profile.memory_bandwidth) == {1} and profile.memory_bandwidth[1] > 0
    assert profile.flops_per_rank(1) > 0 and profile.op_overhead_s > 0
    assert profile.max_ranks_per_node == len(os.sched_getaffinity(0))


def test_calibrate_more_ranks_than_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    proc = tprun("calibrate", "--tp", str(cores + 1), "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tprun calibrate: error: --tp {cores + 1} is more ranks than this host's {cores} cores"
    ]
    assert not any(tmp_path.iterdir())
