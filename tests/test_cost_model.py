"""The cost model (tpcompile/cost/): formulas on hand-checkable inputs, hardware profile files and their
errors, the layer extrapolation, the recommendation rule, and `tpcompile plan` (table, --json, --plot,
one-line errors)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import tpcompile
from tpcompile.cost.advisor import plan_workloads, recommend, recommendation_text
from tpcompile.cost.model import collective_time, predict, ring_factor, step_time
from tpcompile.cost.workload import Collective, RankWork, Workload
from tpcompile.runtime.format.hardware import Link, ProfileError, parse_profile, profile_to_toml

AR, AG = Collective.ALL_REDUCE, Collective.ALL_GATHER

PROFILE = """
name = "toy"
description = "round numbers"
predicted = true
[device]
memory_gib = 1
memory_bandwidth_gbs = {"1" = 10, "2" = 8}
peak_tflops = 0.001
op_overhead_us = 10
max_ranks_per_node = 4
[link]
latency_us = 100
bandwidth_gbs = 1
"""


def _profile(extra: str = ""):  # type: ignore[no-untyped-def]
    return parse_profile(PROFILE + extra, "toy.toml")


def test_ring_factors_and_collective_time() -> None:
    assert ring_factor(AR, 1) == 0.0
    assert ring_factor(AR, 2) == 1.0
    assert ring_factor(AR, 4) == 1.5
    assert ring_factor(AG, 4) == 0.75
    link = Link(latency_s=1e-4, bandwidth_bytes_s=1e9)
    # 100 us + 2 * (4 - 1) / 4 * 1 MB / 1 GB/s = 100 us + 1.5 ms
    assert collective_time(AR, 1e6, 4, link) == pytest.approx(1.6e-3)
    assert collective_time(AG, 1e6, 4, link) == pytest.approx(0.85e-3)
    assert collective_time(AR, 1e6, 1, link) == 0.0


def test_profile_values_and_per_rank_tables() -> None:
    p = _profile()
    assert p.memory_bytes == 2**30
    assert p.bandwidth_per_rank(1) == 10e9
    assert p.bandwidth_per_rank(2) == 8e9
    assert p.bandwidth_per_rank(4) == pytest.approx(4e9)  # 2 ranks' 16 GB/s shared by 4
    assert p.flops_per_rank(3) == 1e9  # a single value: one device per rank
    assert p.op_overhead_s == pytest.approx(1e-5)
    assert p.collective_link(2) == Link(1e-4, 1e9)
    text = profile_to_toml(p)
    assert profile_to_toml(parse_profile(text, "again")) == text


def test_network_profile_fills_one_host_first() -> None:
    p = _profile("[network]\nnodes = 2\nlatency_us = 2000\nbandwidth_gbs = 0.5\n")  # 4 ranks per host
    assert [p.nodes_used(tp) for tp in (1, 4, 5, 8, 16)] == [1, 1, 2, 2, 2]
    assert [p.ranks_on_node(tp) for tp in (4, 5, 8)] == [4, 3, 4]
    assert p.collective_link(4) == p.link
    assert p.collective_link(5) == Link(2e-3, 0.5e9)
    assert predict(_workload(8, streamed=1000), p, 1, 1).fits
    assert not predict(_workload(9, streamed=1000), p, 1, 1).fits
    text = profile_to_toml(p)
    assert profile_to_toml(parse_profile(text, "again")) == text


def _workload(tp: int, streamed: int, kv: int = 0, ops: int = 0, flops: float = 0.0, colls=None):  # type: ignore[no-untyped-def]
    ranks = tuple(RankWork(streamed, streamed, flops, kv, ops) for _ in range(tp))
    return Workload(tp, ranks, Counter(colls or {}), max_seq_len=100)


def test_decode_step_is_slowest_rank_plus_collectives() -> None:
    p = _profile()
    # tp=2: rank 0 reads 80 MB, rank 1 40 MB at 8 GB/s each; 10 all-reduces of 4 kB per token
    w = Workload(
        2,
        (RankWork(80_000_000, 80_000_000, 0.0, 0, 100), RankWork(40_000_000, 40_000_000, 0.0, 0, 100)),
        Counter({(AR, 4000): 10}),
        100,
    )
    s = step_time(w, p, tokens=1)
    assert s.slowest_rank == 0
    assert s.weights_s == pytest.approx(0.01)  # 80 MB / 8 GB/s
    assert s.host_s == pytest.approx(1e-3)  # 100 ops * 10 us
    assert s.comm_s == pytest.approx(10 * (1e-4 + 4000 / 1e9))  # factor 1 at n=2
    assert s.total_s == pytest.approx(0.01 + 1e-3 + 1.04e-3)
    assert s.comm_share == pytest.approx(1.04e-3 / s.total_s)


def test_prefill_is_compute_bound_and_decode_reads_the_cache() -> None:
    p = _profile()
    w = _workload(1, streamed=10_000_000, kv=1000, flops=2e6)
    prefill = step_time(w, p, tokens=100)
    assert prefill.compute_s == pytest.approx(100 * 2e6 / 1e9)  # 0.2 s > 1 ms of weights
    assert prefill.total_s == pytest.approx(0.2)
    decode = step_time(w, p, tokens=1, position=1000)
    assert decode.weights_s == pytest.approx((10_000_000 + 1000 * 1000) / 10e9)
    pred = predict(w, p, prompt_len=100, new_tokens=20)  # mean position 110
    assert pred.decode_tokens_per_s == pytest.approx(1 / max((10_000_000 + 110_000) / 10e9, 2e6 / 1e9))
    assert pred.ttft_s == pytest.approx(0.2)
    assert pred.bytes_per_rank == 10_000_000 + 1000 * 100
    assert pred.fits


def test_fits_needs_memory_and_enough_devices() -> None:
    p = _profile()
    assert not predict(_workload(1, streamed=2**30 + 1), p, 1, 1).fits
    assert not predict(_workload(8, streamed=1000), p, 1, 1).fits  # 4 devices per host, 1 host
    assert predict(_workload(4, streamed=1000), p, 1, 1).fits


def test_extrapolation_is_linear_in_layers() -> None:
    one = Workload(2, (RankWork(10, 8, 16.0, 1, 50),) * 2, Counter({(AR, 4): 3, (AG, 16): 1}), 64)
    two = Workload(2, (RankWork(14, 12, 24.0, 2, 80),) * 2, Counter({(AR, 4): 5, (AG, 16): 1}), 64)
    many = one.extrapolated(two, 10)
    assert many.ranks[0] == RankWork(10 + 9 * 4, 8 + 9 * 4, 16.0 + 9 * 8, 1 + 9, 50 + 9 * 30)
    assert many.collectives == Counter({(AR, 4): 3 + 9 * 2, (AG, 16): 1})
    assert Workload.from_json(json.loads(json.dumps(many.to_json()))) == many


def test_recommendation_rule() -> None:
    p = _profile()

    def preds(speeds: dict[int, float], fit: set[int]):  # type: ignore[no-untyped-def]
        out = []
        for tp, s in speeds.items():
            w = _workload(tp, streamed=int(10e9 / s) if tp in fit else 2**31)
            out.append(predict(w, p, 1, 1))
        return out

    # tp=2 within 10% of tp=4: the smaller one
    rows = preds({1: 100.0, 2: 185.0, 4: 200.0}, {1, 2, 4})
    assert recommend(rows).tp == 2  # type: ignore[union-attr]
    # tp=1 does not fit
    rows = preds({1: 300.0, 2: 100.0}, {2})
    assert recommend(rows).tp == 2  # type: ignore[union-attr]
    assert recommend(preds({1: 10.0}, set())) is None


def test_recommendation_text_says_do_not_shard() -> None:
    from tpcompile.cost.advisor import Row

    p = _profile()
    fast1 = predict(_workload(1, streamed=10_000_000), p, 1, 1)
    slow2 = predict(_workload(2, streamed=9_000_000, colls={(AR, 4000): 100}), p, 1, 1)
    assert fast1.decode_tokens_per_s > slow2.decode_tokens_per_s
    rows = [Row(fast1, True, True), Row(slow2, True, False)]
    assert recommendation_text(rows) == "do not shard: tp=1 is the fastest (sharding loses)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = ", "hardware profile bad.toml is not valid TOML: "),
        (PROFILE.replace("predicted = true\n", ""), "hardware profile bad.toml: missing key 'predicted'"),
        (
            PROFILE.replace("latency_us = 100", 'latency_us = "fast"'),
            "hardware profile bad.toml [link]: 'latency_us' must be a number (got 'fast')",
        ),
        (
            PROFILE.replace("bandwidth_gbs = 1\n", "bandwidth_gbs = 0\n"),
            "hardware profile bad.toml [link]: 'bandwidth_gbs' must be > 0 (got 0)",
        ),
        (
            PROFILE.replace('{"1" = 10, "2" = 8}', '{"2" = 8}'),
            'hardware profile bad.toml [device]: memory_bandwidth_gbs needs the value for 1 rank (key "1")',
        ),
    ],
)
def test_malformed_profiles(text: str, message: str) -> None:
    with pytest.raises(ProfileError) as err:
        parse_profile(text, "bad.toml")
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_shipped_profiles_parse() -> None:
    from tpcompile.cost.profiles import SHIPPED_DIR, load_profile

    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))
    assert {"h100-nvlink", "a100-nvlink", "pcie4", "h100-2hosts-100gbe", "rtx4090-hosts-25gbe"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.predicted  # GPU numbers are predictions
        assert "PREDICTED" in (SHIPPED_DIR / f"{name}.toml").read_text()


# --- the advisor on a real (tiny) config ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Llama config.json (no weights): 4 query heads over 2 KV heads."""
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(
        json.dumps(
            dict(
                model_type="llama",
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=4,
                vocab_size=1000,
                max_position_embeddings=256,
                tie_word_embeddings=False,
            )
        )
    )
    return path


def test_extrapolated_plan_equals_the_full_plan(tiny_config: Path) -> None:
    from tpcompile.compiler import plan_model
    from tpcompile.cost.extract import workload
    from tpcompile.frontend.hf_shape import capture_shape, read_config

    planned = plan_workloads(str(tiny_config), [1, 2], "fp32", 128, lambda _m: None)
    assert planned.extrapolated and planned.layers == 4
    full = capture_shape(read_config(str(tiny_config)), 4, "fp32", 128, "config.json")
    for tp in (1, 2):
        assert planned.workloads[tp] == workload(full, plan_model(full, tp)[1])
    w2 = planned.workloads[2]
    # 2 all-reduces per layer + the embedding's, and the greedy argmax gather
    assert w2.collectives[(AR, 64 * 4)] == 2 * 4 + 1
    assert w2.collectives[(AG, 16)] == 1
    # fp32 bytes per rank: half of every projection and of the vocabulary, whole norms
    per_layer = (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) * 4 // 2 + 2 * 64 * 4  # q,o k,v mlp; norms
    rotary = 2 * 8 * 4  # inv_freq and original_inv_freq: head_dim / 2 floats each
    assert w2.ranks[0].weight_bytes == 4 * per_layer + (2 * 1000 * 64 * 4) // 2 + 64 * 4 + rotary
    assert w2.ranks[0].streamed_bytes == w2.ranks[0].weight_bytes - 1000 * 64 * 4 // 2  # the lookup table
    assert w2.ranks[0].kv_bytes_per_position == 4 * 2 * 1 * 16 * 4  # layers, k+v, 1 of 2 KV heads, dim 16


def test_plan_cli_json_and_plot(tiny_config: Path, tmp_path: Path) -> None:
    png = tmp_path / "tp.png"
    proc = tpcompile(
        "plan",
        tiny_config,
        "--tp",
        "1,2",
        "--profile",
        "h100-nvlink",
        "--profile",
        "pcie4",
        "--dtype",
        "fp32",
        "--max-seq-len",
        "128",
        "--json",
        "--plot",
        png,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["profile"], r["tp"]) for r in rows] == [
        ("h100-nvlink", 1),
        ("h100-nvlink", 2),
        ("pcie4", 1),
        ("pcie4", 2),
    ]
    keys = {"tp", "profile", "decode_tokens_per_s", "ttft_s", "comm_share", "bytes_per_rank", "fits"}
    assert all(keys <= set(r) for r in rows)
    assert sum(r["recommended"] for r in rows) == 2  # one per profile
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = tpcompile("plan", tiny_config, "--tp", "1,2", "--profile", "pcie4", "--quiet")
    assert table.returncode == 0, table.stderr
    assert "PREDICTED from data-sheet numbers" in table.stdout
    assert "recommendation: " in table.stdout
    assert "4 layers (planned at 1 and 2 layers, extrapolated)" in table.stdout


def _one_line(proc) -> str:  # type: ignore[no-untyped-def]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_plan_cli_errors(tiny_config: Path, tmp_path: Path) -> None:
    proc = tpcompile("plan", tiny_config, "--profile", "dgx-9000")
    assert proc.returncode == 2
    assert _one_line(proc).startswith(
        "tpcompile: error: unknown hardware profile 'dgx-9000'; known: a100-nvlink, "
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(PROFILE.replace("[link]\n", ""))
    proc = tpcompile("plan", tiny_config, "--profile", bad)
    assert proc.returncode == 2
    assert _one_line(proc) == f"tpcompile: error: hardware profile {bad}: missing key 'link'"
    proc = tpcompile("plan", tiny_config, "--profile", "pcie4", "--tp", "2,x")
    assert proc.returncode == 2
    assert _one_line(proc) == (
        "tpcompile: error: Invalid value for '--tp': '2,x' is not a comma-separated list of integers"
    )
    proc = tpcompile("plan", tiny_config, "--profile", "pcie4", "--tp", "2,2048", "--quiet")
    assert proc.returncode == 2
    assert _one_line(proc).startswith(
        "tpcompile: error: --tp 2048 is more ranks than any weight of the model"
    )


def test_explain_with_a_profile(gpt_pt2: Path, tmp_path: Path) -> None:
    """The manifest records the workload (extra.cost); explain --profile predicts from it, layer by layer."""
    out = tmp_path / "gpt"
    assert tpcompile(gpt_pt2, "--tp", "2", "-o", out, "--quiet").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    w = Workload.from_json(manifest["extra"]["cost"])
    assert w.tp == 2 and w.collective_count() == sum(1 for _ in manifest["collectives"])
    assert [r.weight_bytes for r in w.ranks] == [r["weight_bytes"] for r in manifest["ranks"]]
    proc = tpcompile("explain", out, "--profile", "pcie4")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "predicted decode step on pcie4 [PREDICTED from data-sheet numbers]:" in text
    rows = [ln.split() for ln in text.splitlines() if re.match(r"  layer \d+ ", ln)]
    assert [r[1] for r in rows] == ["0", "1"]  # the example GPT's 2 blocks
    assert [r[3] for r in rows] == ["2", "2"]  # each with its 2 all-reduces
    bad = tpcompile("explain", out, "--profile", "nope")
    assert bad.returncode == 2
    assert _one_line(bad).startswith("tpcompile: error: unknown hardware profile 'nope'")
