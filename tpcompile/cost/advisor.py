"""``tpcompile plan``: plan a model at several tp (no weights written), predict each plan on each hardware
profile, and recommend a tp.

A Hugging Face config (a checkpoint directory, config.json or .gguf) is captured from its config alone
(``frontend/hf_shape.py``); a model deeper than 2 layers is planned at 1 and 2 layers and its workload
extrapolated to its depth (exact for identical layers), so a 70B-shaped config plans in seconds. Other
models (``.pt2``, factories) are planned whole.

Invariant: the recommendation for a profile is the smallest tp whose plan fits the profile's memory and
is within 10% of the fastest fitting tp; "do not shard" when that is tp=1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpcompile.cost.model import Prediction, predict
from tpcompile.cost.workload import Workload
from tpcompile.runtime.format.hardware import HardwareProfile

WITHIN = 0.10  # a smaller tp within 10% of the fastest is recommended


@dataclass(frozen=True)
class PlannedModel:
    source: str
    layers: int | None  # decoder layers (None: not a language model config)
    extrapolated: bool  # planned at 1 and 2 layers, scaled to ``layers``
    dtype: str
    workloads: dict[int, Workload]


def _is_config(spec: str) -> bool:
    path = Path(spec)
    return path.suffix in (".gguf", ".json") or (path.is_dir() and (path / "config.json").is_file())


def plan_workloads(
    spec: str, tps: Sequence[int], dtype: str, max_seq_len: int | None, say: Callable[[str], None]
) -> PlannedModel:
    """The workload of ``spec`` planned at every tp of ``tps`` (no weights read or written)."""
    from tpcompile.compiler import plan_model
    from tpcompile.cost.extract import workload

    if not _is_config(spec):
        from tpcompile.frontend import load_model

        say(f"capturing {spec}")
        captured = load_model(spec)
        out = {}
        for tp in tps:
            say(f"planning tp={tp}")
            out[tp] = workload(captured, plan_model(captured, tp)[1])
        return PlannedModel(spec, None, False, "-", out)

    from tpcompile.frontend.hf_shape import capture_shape, read_config, text_layers

    config = read_config(spec)
    layers = text_layers(config)
    depths = [layers] if layers <= 2 else [1, 2]
    name = Path(spec).name
    shallow: dict[int, dict[int, Workload]] = {}
    for depth in depths:
        say(f"capturing {name} with {depth} layer(s)")
        captured = capture_shape(config, depth, dtype, max_seq_len, name)
        for tp in tps:
            say(f"planning tp={tp} ({depth} layer(s))")
            shallow.setdefault(tp, {})[depth] = workload(captured, plan_model(captured, tp)[1])
    if layers <= 2:
        return PlannedModel(spec, layers, False, dtype, {tp: w[layers] for tp, w in shallow.items()})
    return PlannedModel(
        spec, layers, True, dtype, {tp: w[1].extrapolated(w[2], layers) for tp, w in shallow.items()}
    )


@dataclass(frozen=True)
class Row:
    prediction: Prediction
    predicted_hardware: bool  # the profile's numbers are data-sheet predictions, not measured here
    recommended: bool

    def to_json(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "tp": p.tp,
            "profile": p.profile,
            "decode_tokens_per_s": round(p.decode_tokens_per_s, 3),
            "ttft_s": round(p.ttft_s, 6),
            "comm_share": round(p.comm_share, 4),
            "bytes_per_rank": p.bytes_per_rank,
            "fits": p.fits,
            "recommended": self.recommended,
            "hardware_predicted": self.predicted_hardware,
            "decode_step_ms": {
                "weights": round(p.decode.weights_s * 1e3, 4),
                "compute": round(p.decode.compute_s * 1e3, 4),
                "host": round(p.decode.host_s * 1e3, 4),
                "communication": round(p.decode.comm_s * 1e3, 4),
            },
        }


def recommend(predictions: Sequence[Prediction]) -> Prediction | None:
    """The smallest fitting tp within 10% of the fastest fitting one (None: nothing fits)."""
    fitting = [p for p in predictions if p.fits]
    if not fitting:
        return None
    best = max(p.decode_tokens_per_s for p in fitting)
    return min((p for p in fitting if p.decode_tokens_per_s >= (1 - WITHIN) * best), key=lambda p: p.tp)


def advise(
    planned: PlannedModel, profiles: Sequence[HardwareProfile], prompt_len: int, new_tokens: int
) -> list[Row]:
    rows: list[Row] = []
    for profile in profiles:
        preds = [predict(w, profile, prompt_len, new_tokens) for _, w in sorted(planned.workloads.items())]
        rec = recommend(preds)
        rows += [Row(p, profile.predicted, p is rec) for p in preds]
    return rows


def recommendation_text(rows: Sequence[Row]) -> str:
    """One line for the rows of one profile."""
    rec = next((r.prediction for r in rows if r.recommended), None)
    if rec is None:
        return "nothing fits: no tp given holds the weights and KV cache in this profile's memory"
    fitting = [r.prediction for r in rows if r.prediction.fits]
    best = max(fitting, key=lambda p: p.decode_tokens_per_s)
    if rec.tp == 1:
        if best.tp == 1:
            return "do not shard: tp=1 is the fastest (sharding loses)"
        return f"do not shard: tp=1 is within {WITHIN:.0%} of the fastest (tp={best.tp})"
    smaller = [p for p in fitting if p.tp < rec.tp]
    why = (
        f"the fastest ({rec.decode_tokens_per_s:.0f} tokens/s)"
        if rec is best
        else f"within {WITHIN:.0%} of the fastest (tp={best.tp}, {best.decode_tokens_per_s:.0f} tokens/s)"
    )
    if not smaller and any(not r.prediction.fits and r.prediction.tp < rec.tp for r in rows):
        why += "; smaller tp do not fit"
    return f"tp={rec.tp}: the smallest tp that fits and is {why}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_table(
    planned: PlannedModel,
    profiles: Sequence[HardwareProfile],
    rows: Sequence[Row],
    prompt_len: int,
    new_tokens: int,
) -> str:
    depth = ""
    if planned.layers is not None:
        how = " (planned at 1 and 2 layers, extrapolated)" if planned.extrapolated else ""
        depth = f", {planned.layers} layers{how}"
    lines = [
        f"model {planned.source}{depth}, dtype {planned.dtype}; prompt {prompt_len} tokens, "
        f"{new_tokens} new tokens"
    ]
    for profile in profiles:
        mine = [r for r in rows if r.prediction.profile == profile.name]
        kind = "PREDICTED from data-sheet numbers" if profile.predicted else "measured on this host"
        lines += ["", f"{profile.name}: {profile.description} [{kind}]"]
        lines.append(
            f"  {'tp':>3}  {'weights+KV/rank':>15}  {'fits':>4}  {'decode tok/s':>12}  {'TTFT ms':>9}  "
            f"{'comm':>5}"
        )
        for r in mine:
            p = r.prediction
            mark = "  <- recommended" if r.recommended else ""
            lines.append(
                f"  {p.tp:>3}  {_gib(p.bytes_per_rank):>15}  {'yes' if p.fits else 'no':>4}  "
                f"{p.decode_tokens_per_s:>12.1f}  {p.ttft_s * 1e3:>9.1f}  {p.comm_share:>5.0%}{mark}"
            )
        lines.append(f"  recommendation: {recommendation_text(mine)}")
    return "\n".join(lines)
